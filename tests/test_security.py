"""API keys and roles, TLS (plain and mutual), the loopback rule, and metrics."""

from __future__ import annotations

import datetime as dt
import json
import logging
import urllib.request

import pytest

from xmodal import client as xc
from xmodal.indexer.errors import InvalidArgument
from xmodal.server.auth import KeyRing, add_key
from xmodal.server.engine import SearchEngine
from xmodal.server.service import Server, TLSConfig


@pytest.fixture(scope="module")
def engine(indexed, encoder):
    engine = SearchEngine(indexed, encoder)
    engine.load_current()
    return engine


@pytest.fixture(scope="module")
def keyed(engine, tmp_path_factory):
    path = tmp_path_factory.mktemp("keys") / "keys.json"
    keys = {role: add_key(path, f"{role}-user", role) for role in ("search", "feedback", "admin")}
    server = Server(engine, port=0, keys=KeyRing.load(path)).start()
    yield server, keys, path
    server.stop(grace=1)


def test_key_file_holds_only_hashes(keyed):
    _, keys, path = keyed
    text = path.read_text()
    assert all(key not in text for key in keys.values())
    assert {k["role"] for k in json.loads(text)["keys"]} == {"search", "feedback", "admin"}
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_no_key_and_wrong_key_are_unauthenticated(keyed):
    server, keys, _ = keyed
    with xc.SearchClient(server.address) as client:
        with pytest.raises(xc.Unauthenticated, match="authorization: Bearer"):
            client.search(text="a red ring")
        assert client.health() == "SERVING"  # health stays open
    with xc.SearchClient(server.address, api_key=keys["search"] + "x") as client:
        with pytest.raises(xc.Unauthenticated, match="not recognised"):
            client.status()


def test_roles(keyed, world_corpus):
    server, keys, _ = keyed
    record = json.loads((world_corpus / "captions.jsonl").read_text().splitlines()[0])
    with xc.SearchClient(server.address, api_key=keys["search"]) as client:
        assert len(client.search(text="a red ring", k=2)) == 2 and client.status().serving
        with pytest.raises(xc.PermissionDenied, match="needs role feedback"):
            client.submit_feedback(text="a red ring", relevant=[record["id"]])
        with pytest.raises(xc.PermissionDenied, match="needs role admin"):
            client.refit("query")
    with xc.SearchClient(server.address, api_key=keys["feedback"]) as client:
        assert client.submit_feedback(text="a red ring", relevant=[record["id"]]).startswith("fb-")
        with pytest.raises(xc.PermissionDenied):
            client.list_snapshots()
    with xc.SearchClient(server.address, api_key=keys["admin"]) as client:
        assert any(s.live for s in client.list_snapshots())


def test_only_admins_see_the_data_directory(keyed, indexed):
    server, keys, _ = keyed
    seen = {}
    for role in ("search", "feedback", "admin"):
        with xc.SearchClient(server.address, api_key=keys[role]) as client:
            seen[role] = client.status().raw.data_dir
    assert seen == {"search": "", "feedback": "", "admin": str(indexed)}


def test_keys_never_appear_in_logs(engine, tmp_path, caplog):
    path = tmp_path / "keys.json"
    key = add_key(path, "ops", "admin")
    with caplog.at_level(logging.DEBUG):
        server = Server(engine, port=0, keys=KeyRing.load(path)).start()
        with xc.SearchClient(server.address, api_key=key) as client:
            client.status()
        with xc.SearchClient(server.address, api_key=key + "wrong") as client:
            with pytest.raises(xc.Unauthenticated):
                client.status()
        server.stop(grace=1)
    assert key not in caplog.text


def test_environment_keys_and_bad_configs(tmp_path):
    ring = KeyRing.load(environ={"XMODAL_API_KEYS": "search:abc, admin:def"})
    assert ring.role_of("abc").role == "search" and ring.role_of("def").role == "admin" and ring.role_of("x") is None
    with pytest.raises(InvalidArgument, match="role:key"):
        KeyRing.load(environ={"XMODAL_API_KEYS": "nocolon"})
    with pytest.raises(InvalidArgument, match="unknown role"):
        KeyRing.load(environ={"XMODAL_API_KEYS": "root:abc"})
    (tmp_path / "bad.json").write_text("{}")
    with pytest.raises(InvalidArgument, match="cannot read API keys"):
        KeyRing.load(tmp_path / "bad.json", environ={})


def test_non_loopback_without_keys_is_refused(engine):
    with pytest.raises(InvalidArgument, match="without API keys"):
        Server(engine, host="0.0.0.0", port=0)


def make_certs(folder):
    """A CA, a server certificate for 127.0.0.1/localhost, and a client certificate."""
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    def key_pem(key):
        return key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    now = dt.datetime.now(dt.timezone.utc)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "xmodal test CA")])
    ca = (
        x509.CertificateBuilder()
        .subject_name(ca_name)
        .issuer_name(ca_name)
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )

    def leaf(name, san):
        key = ec.generate_private_key(ec.SECP256R1())
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=1))
            .not_valid_after(now + dt.timedelta(days=1))
        )
        if san:
            builder = builder.add_extension(x509.SubjectAlternativeName(san), critical=False)
        return builder.sign(ca_key, hashes.SHA256()), key

    server_cert, server_key = leaf(
        "localhost", [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
    )
    client_cert, client_key = leaf("xmodal client", None)
    files = {}
    for name, data in (
        ("ca.pem", ca.public_bytes(serialization.Encoding.PEM)),
        ("server.pem", server_cert.public_bytes(serialization.Encoding.PEM)),
        ("server.key", key_pem(server_key)),
        ("client.pem", client_cert.public_bytes(serialization.Encoding.PEM)),
        ("client.key", key_pem(client_key)),
    ):
        (folder / name).write_bytes(data)
        files[name] = folder / name
    return files


def test_tls_end_to_end(engine, tmp_path):
    certs = make_certs(tmp_path)
    server = Server(engine, port=0, tls=TLSConfig(certs["server.pem"], certs["server.key"])).start()
    try:
        with xc.SearchClient(server.address, tls=True, ca_cert=certs["ca.pem"]) as client:
            assert len(client.search(text="a red ring", k=3)) == 3
        with xc.SearchClient(server.address, tls=True, timeout=5) as client:  # system CAs do not know ours
            with pytest.raises(xc.Unavailable, match="ca_cert"):
                client.status()
        with xc.SearchClient(server.address, timeout=5) as client:  # plaintext to a TLS port
            with pytest.raises(xc.Unavailable):
                client.status()
    finally:
        server.stop(grace=1)


def test_mutual_tls_requires_a_client_certificate(engine, tmp_path):
    certs = make_certs(tmp_path)
    server = Server(engine, port=0, tls=TLSConfig(certs["server.pem"], certs["server.key"], certs["ca.pem"])).start()
    try:
        with xc.SearchClient(
            server.address, ca_cert=certs["ca.pem"], client_cert=certs["client.pem"], client_key=certs["client.key"]
        ) as client:
            assert client.status().serving
        with xc.SearchClient(server.address, ca_cert=certs["ca.pem"], timeout=5) as client:
            with pytest.raises(xc.Unavailable):
                client.status()
    finally:
        server.stop(grace=1)


def test_metrics_endpoint_counts_requests_by_status(keyed, engine):

    from xmodal.server import metrics

    server, keys, _ = keyed
    before = metrics.REQUESTS.labels("Search", "INVALID_ARGUMENT")._value.get()
    with xc.SearchClient(server.address, api_key=keys["search"]) as client:
        with pytest.raises(xc.InvalidArgument):
            client.search(text="")
        client.search(text="a red ring")
    assert metrics.REQUESTS.labels("Search", "INVALID_ARGUMENT")._value.get() == before + 1
    http, _thread = metrics.serve(0)
    try:
        port = http.server_port
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    finally:
        http.shutdown()
    assert 'xmodal_requests_total{code="OK",method="Search"}' in body
    assert 'xmodal_index_vectors{modality="image"} 400.0' in body
    assert "xmodal_request_seconds_bucket" in body
