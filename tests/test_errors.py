"""Every known bad input, through the gRPC API and through the CLI (issue 13, item 6).

Over gRPC (the generated stubs on a plain channel, so no client code validates first)
each bad request gets its own status code, never INTERNAL, with details that say what to
fix, and the server logs no traceback. Through the `xmodal` command line each bad input
exits with status 2 and one line ``xmodal <command>: ...`` on stderr (or argparse's usage
error), never a traceback.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import re
import shutil
import socket
import subprocess

import grpc
import pytest
from PIL import Image

from xmodal.v1 import xmodal_pb2 as pb
from xmodal.v1 import xmodal_pb2_grpc as pb_grpc

from conftest import xmodal_cmd
from test_fuzz import png_declaring

OFFLINE = {**os.environ, "HF_HUB_OFFLINE": "1"}
INVALID, NOT_FOUND, EXHAUSTED = "INVALID_ARGUMENT", "NOT_FOUND", "RESOURCE_EXHAUSTED"
SERVICE = {
    "Search": "search",
    "GetItems": "search",
    "SubmitFeedback": "search",
    "Refit": "admin",
    "ListSnapshots": "admin",
    "Rollback": "admin",
}


def truncated_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (64, 64), (200, 10, 10)).save(buffer, "PNG")
    return buffer.getvalue()[:60]


def search(query: pb.Query | None = None, k: int = 5, target: int = 0) -> pb.SearchRequest:
    return pb.SearchRequest(query=query, k=k, target=target)


def feedback(
    item: str, *, query: pb.Query | None = None, relevant=None, irrelevant=(), weight: float = 1.0, source: str = ""
) -> pb.SubmitFeedbackRequest:
    return pb.SubmitFeedbackRequest(
        query=query if query is not None else pb.Query(text="a red circle"),
        relevant_ids=[item] if relevant is None else relevant,
        irrelevant_ids=list(irrelevant),
        weight=weight,
        source=source,
    )


def rpc_case(name: str, method: str, make, code: str, details: str, *marks):
    """One bad request: ``make(item)`` builds it (``item`` is an indexed image id); it must
    fail with ``code`` and details matching the regex ``details``."""
    return pytest.param(method, make, code, details, id=name, marks=marks)


RPC_CASES = [
    # -- Search ------------------------------------------------------------------------
    rpc_case("search-no-query", "Search", lambda item: search(), INVALID, "set one of query.text"),
    rpc_case(
        "search-empty-text",
        "Search",
        lambda item: search(pb.Query(text="")),
        INVALID,
        "query text is empty: send the words",
    ),
    rpc_case(
        "search-whitespace-text",
        "Search",
        lambda item: search(pb.Query(text=" \n\t ")),
        INVALID,
        "query text is empty: send the words",
    ),
    rpc_case(
        "search-text-too-long",
        "Search",
        lambda item: search(pb.Query(text="red " * 2_501)),
        EXHAUSTED,
        "10,004 characters, over the limit of 10,000",
    ),
    rpc_case(
        "search-image-not-an-image",
        "Search",
        lambda item: search(pb.Query(image=b"plain text, no picture")),
        INVALID,
        "not a recognised image format: send JPEG, PNG",
    ),
    rpc_case(
        "search-image-empty-bytes",
        "Search",
        lambda item: search(pb.Query(image=b"")),
        INVALID,
        "image bytes are empty: send the encoded file",
    ),
    rpc_case(
        "search-image-truncated",
        "Search",
        lambda item: search(pb.Query(image=truncated_png())),
        INVALID,
        "truncated or corrupt",
    ),
    rpc_case(
        "search-image-too-many-bytes",
        "Search",
        lambda item: search(pb.Query(image=bytes(20 * 2**20 + 1))),
        EXHAUSTED,
        "20,971,521 bytes, over the limit of 20,971,520",
    ),
    rpc_case(
        "search-image-too-many-pixels",
        "Search",
        lambda item: search(pb.Query(image=png_declaring(10_000, 6_000))),
        EXHAUSTED,
        "over the limit of 50,000,000: downscale it",
    ),
    rpc_case(
        "search-k-zero",
        "Search",
        lambda item: search(pb.Query(text="red"), k=0),
        INVALID,
        "k must be between 1 and 1000, got 0",
    ),
    rpc_case(
        "search-k-negative",
        "Search",
        lambda item: search(pb.Query(text="red"), k=-3),
        INVALID,
        "k must be between 1 and 1000, got -3",
    ),
    rpc_case(
        "search-k-over-max",
        "Search",
        lambda item: search(pb.Query(text="red"), k=1001),
        INVALID,
        "k must be between 1 and 1000, got 1001",
    ),
    rpc_case(
        "search-unknown-target-modality",
        "Search",
        lambda item: search(pb.Query(text="red"), target=7),
        INVALID,
        r"unknown modality 7: use MODALITY_IMAGE \(1\) or MODALITY_TEXT \(2\)",
    ),
    rpc_case(
        "search-unknown-item-id",
        "Search",
        lambda item: search(pb.Query(item_id="no-such-item")),
        NOT_FOUND,
        "no indexed item with id 'no-such-item'",
    ),
    rpc_case(
        "search-empty-item-id",
        "Search",
        lambda item: search(pb.Query(item_id="")),
        INVALID,
        "item_id is empty: pass the id of an indexed item",
    ),
    # -- GetItems ----------------------------------------------------------------------
    rpc_case(
        "get-items-no-ids",
        "GetItems",
        lambda item: pb.GetItemsRequest(),
        INVALID,
        "item_ids is empty: pass at least one item id",
    ),
    rpc_case(
        "get-items-too-many-ids",
        "GetItems",
        lambda item: pb.GetItemsRequest(item_ids=[f"id-{n}" for n in range(101)]),
        EXHAUSTED,
        "101 ids in one request, over the limit of 100: split the request",
    ),
    rpc_case(
        "get-items-unknown-ids",
        "GetItems",
        lambda item: pb.GetItemsRequest(item_ids=[item, "nope-1", "nope-2"]),
        NOT_FOUND,
        "unknown item id\\(s\\): 'nope-1', 'nope-2'",
    ),
    rpc_case(
        "get-items-empty-id",
        "GetItems",
        lambda item: pb.GetItemsRequest(item_ids=[item, ""]),
        INVALID,
        "item id is empty",
    ),
    rpc_case(
        "get-items-whitespace-id",
        "GetItems",
        lambda item: pb.GetItemsRequest(item_ids=["  "]),
        INVALID,
        "item id is empty",
    ),
    # -- SubmitFeedback ----------------------------------------------------------------
    rpc_case(
        "feedback-no-query",
        "SubmitFeedback",
        lambda item: pb.SubmitFeedbackRequest(relevant_ids=[item]),
        INVALID,
        "query is empty: set one of query.text",
    ),
    rpc_case(
        "feedback-empty-query-text",
        "SubmitFeedback",
        lambda item: feedback(item, query=pb.Query(text=" ")),
        INVALID,
        "query text is empty",
    ),
    rpc_case(
        "feedback-query-not-an-image",
        "SubmitFeedback",
        lambda item: feedback(item, query=pb.Query(image=b"GIF89a but not really")),
        INVALID,
        "image header could not be read|not a recognised image format|truncated or corrupt",
    ),
    rpc_case(
        "feedback-unknown-query-item",
        "SubmitFeedback",
        lambda item: feedback(item, query=pb.Query(item_id="no-such-item")),
        NOT_FOUND,
        "unknown query item id 'no-such-item'",
    ),
    rpc_case(
        "feedback-empty-query-item",
        "SubmitFeedback",
        lambda item: feedback(item, query=pb.Query(item_id="")),
        INVALID,
        "item_id is empty",
    ),
    rpc_case(
        "feedback-no-relevant-ids",
        "SubmitFeedback",
        lambda item: feedback(item, relevant=[]),
        INVALID,
        "at least one relevant item id",
    ),
    rpc_case(
        "feedback-unknown-relevant-id",
        "SubmitFeedback",
        lambda item: feedback(item, relevant=[item, "nope"]),
        NOT_FOUND,
        "unknown item id\\(s\\) in feedback: 'nope'",
    ),
    rpc_case(
        "feedback-unknown-irrelevant-id",
        "SubmitFeedback",
        lambda item: feedback(item, irrelevant=["nope"]),
        NOT_FOUND,
        "unknown item id\\(s\\) in feedback: 'nope'",
    ),
    rpc_case(
        "feedback-empty-relevant-id",
        "SubmitFeedback",
        lambda item: feedback(item, relevant=[""]),
        INVALID,
        "item id in relevant_ids or irrelevant_ids is empty",
    ),
    rpc_case(
        "feedback-weight-nan",
        "SubmitFeedback",
        lambda item: feedback(item, weight=math.nan),
        INVALID,
        r"weight must be a finite number in \(0, 100\], got nan",
    ),
    rpc_case(
        "feedback-weight-inf",
        "SubmitFeedback",
        lambda item: feedback(item, weight=math.inf),
        INVALID,
        r"weight must be a finite number in \(0, 100\], got inf",
    ),
    rpc_case(
        "feedback-weight-negative",
        "SubmitFeedback",
        lambda item: feedback(item, weight=-1.0),
        INVALID,
        r"weight must be a finite number in \(0, 100\], got -1",
    ),
    rpc_case(
        "feedback-weight-over-100",
        "SubmitFeedback",
        lambda item: feedback(item, weight=101.0),
        INVALID,
        r"weight must be a finite number in \(0, 100\], got 101",
    ),
    rpc_case(
        "feedback-too-many-ids",
        "SubmitFeedback",
        lambda item: feedback(item, relevant=[item] * 60, irrelevant=[item] * 41),
        EXHAUSTED,
        "101 item ids in one feedback event, over the limit of 100",
    ),
    rpc_case(
        "feedback-source-too-long",
        "SubmitFeedback",
        lambda item: feedback(item, source="s" * 201),
        INVALID,
        "source tag is longer than 200 characters",
    ),
    # -- AdminService ------------------------------------------------------------------
    rpc_case(
        "refit-unknown-mode",
        "Refit",
        lambda item: pb.RefitRequest(mode="sideways"),
        INVALID,
        "refit mode must be one of auto, query, full, got 'sideways'",
    ),
    rpc_case(
        "rollback-unknown-snapshot",
        "Rollback",
        lambda item: pb.RollbackRequest(snapshot_id="no-such-snapshot"),
        NOT_FOUND,
        "no snapshot 'no-such-snapshot'; ListSnapshots shows the ones kept",
    ),
    rpc_case(
        "rollback-empty-snapshot-id",
        "Rollback",
        lambda item: pb.RollbackRequest(snapshot_id=" "),
        INVALID,
        "snapshot_id is empty: pass an id from ListSnapshots",
    ),
]


@pytest.fixture(scope="module")
def stubs(running):
    channel = grpc.insecure_channel(running.server.address, options=[("grpc.max_send_message_length", 64 * 2**20)])
    yield {"search": pb_grpc.SearchServiceStub(channel), "admin": pb_grpc.AdminServiceStub(channel)}
    channel.close()


@pytest.fixture(scope="module")
def image_item(world_corpus) -> str:
    """The id of an indexed image item."""
    return json.loads((world_corpus / "captions.jsonl").read_text().splitlines()[0])["id"]


@pytest.mark.parametrize(("method", "make", "code", "details"), RPC_CASES)
def test_bad_request_gets_its_status_and_says_what_to_fix(stubs, image_item, caplog, method, make, code, details):
    call = getattr(stubs[SERVICE[method]], method)
    with caplog.at_level(logging.INFO, logger="xmodal"), pytest.raises(grpc.RpcError) as info:
        call(make(image_item), timeout=60)
    error = info.value
    assert error.code() != grpc.StatusCode.INTERNAL, error.details()
    assert error.code().name == code, error.details()
    assert re.search(details, error.details()), error.details()
    assert not [r for r in caplog.records if r.exc_info], "the server logged a traceback"


def test_list_snapshots_and_status_answer(stubs):
    listing = stubs["admin"].ListSnapshots(pb.ListSnapshotsRequest(), timeout=30)
    assert listing.snapshots and listing.live_id in {s.snapshot_id for s in listing.snapshots}
    status = stubs["search"].GetStatus(pb.GetStatusRequest(), timeout=30)
    assert status.serving and status.snapshot.snapshot_id == listing.live_id


# -- the command line ------------------------------------------------------------------------


def cli_case(name: str, args, *marks, usage: bool = False, details: str = ""):
    """``args(ctx)`` builds the command line; it must exit 2 with one error line (or
    argparse's usage error when ``usage``) matching the regex ``details``."""
    return pytest.param(args, usage, details, id=name, marks=marks)


CLI_CASES = [
    cli_case(
        "search-k-zero",
        lambda c: ["search", "--server", c["server"], "--text", "red", "-k", "0"],
        details="k must be between 1 and 1000, got 0",
    ),
    cli_case(
        "search-k-over-max",
        lambda c: ["search", "--server", c["server"], "--text", "red", "-k", "5000"],
        details="k must be between 1 and 1000",
    ),
    cli_case(
        "search-empty-text", lambda c: ["search", "--server", c["server"], "--text", " "], details="query text is empty"
    ),
    cli_case(
        "search-image-not-an-image",
        lambda c: ["search", "--server", c["server"], "--image", c["notes"]],
        details="not a recognised image format",
    ),
    cli_case(
        "search-image-missing-file",
        lambda c: ["search", "--server", c["server"], "--image", c["missing"]],
        details="cannot read the query image .*: pass the path of an image file",
    ),
    cli_case(
        "search-unknown-item",
        lambda c: ["search", "--server", c["server"], "--item", "no-such-item"],
        details="no indexed item with id 'no-such-item'",
    ),
    cli_case(
        "search-unknown-target",
        lambda c: ["search", "--server", c["server"], "--text", "red", "--target", "x"],
        usage=True,
        details="invalid choice",
    ),
    cli_case(
        "search-nothing-listens",
        lambda c: ["search", "--server", c["dead"], "--text", "red", "--timeout", "5"],
        details="unavailable",
    ),
    cli_case(
        "search-empty-server",
        lambda c: ["search", "--server", "", "--text", "red"],
        details="server address '' is empty: pass host:port",
    ),
    cli_case(
        "status-nothing-listens", lambda c: ["status", "--server", c["dead"], "--timeout", "5"], details="unavailable"
    ),
    cli_case(
        "feedback-file-not-json",
        lambda c: ["feedback", "--server", c["server"], "--file", c["not_json"]],
        details="line 1",
    ),
    cli_case(
        "feedback-file-unknown-field",
        lambda c: ["feedback", "--server", c["server"], "--file", c["unknown_field"]],
        details="line 1: unknown field.*colour",
    ),
    cli_case(
        "feedback-file-line-not-an-object",
        lambda c: ["feedback", "--server", c["server"], "--file", c["string"]],
        details="line 1",
    ),
    cli_case(
        "feedback-file-weight-not-a-number",
        lambda c: ["feedback", "--server", c["server"], "--file", c["bad_weight"]],
        details="line 1.*weight",
    ),
    cli_case(
        "feedback-file-missing",
        lambda c: ["feedback", "--server", c["server"], "--file", c["missing"]],
        details="No such file",
    ),
    cli_case(
        "feedback-unknown-relevant-id",
        lambda c: ["feedback", "--server", c["server"], "--text", "red", "--relevant", "no-such-item"],
        details="unknown item id\\(s\\) in feedback: 'no-such-item'",
    ),
    cli_case(
        "feedback-without-relevant",
        lambda c: ["feedback", "--server", c["server"], "--text", "red"],
        details="--relevant",
    ),
    cli_case(
        "refit-server-and-data", lambda c: ["refit", "--server", c["server"], "--data", c["data"]], details="not both"
    ),
    cli_case(
        "refit-unknown-mode",
        lambda c: ["refit", "--server", c["server"], "--mode", "sideways"],
        usage=True,
        details="invalid choice",
    ),
    cli_case(
        "snapshots-rollback-unknown-data",
        lambda c: ["snapshots", "--data", c["data"], "--rollback", "nope"],
        details="no snapshot 'nope'",
    ),
    cli_case(
        "snapshots-rollback-unknown-server",
        lambda c: ["snapshots", "--server", c["server"], "--rollback", "nope"],
        details="no snapshot 'nope'",
    ),
    cli_case(
        "index-missing-corpus",
        lambda c: ["index", c["missing"], "--data", c["fresh"], "--model", "xmodal-demo", "--no-progress"],
        details="does not exist: pass a folder with captions.jsonl",
    ),
    cli_case(
        "index-folder-without-captions",
        lambda c: ["index", c["no_captions"], "--data", c["fresh"], "--model", "xmodal-demo", "--no-progress"],
        details="without captions.jsonl or captions.csv: add one",
    ),
    cli_case(
        "index-captions-not-json",
        lambda c: ["index", c["bad_captions"], "--data", c["fresh"], "--model", "xmodal-demo", "--no-progress"],
        details="captions.jsonl:1: not valid JSON",
    ),
    cli_case(
        "index-data-is-a-file",
        lambda c: ["index", c["corpus"], "--data", c["notes"], "--model", "xmodal-demo", "--no-progress"],
        details="--data",
    ),
    cli_case(
        "index-shard-size-zero",
        lambda c: ["index", c["corpus"], "--data", c["fresh"], "--model", "xmodal-demo", "--shard-size", "0"],
        details="shard_size must be at least 1",
    ),
    cli_case(
        "fit-empty-folder",
        lambda c: ["fit", "--data", c["empty"], "--no-progress"],
        details="no catalog in .*: run `xmodal index CORPUS --data",
    ),
    cli_case(
        "fit-zero-epochs",
        lambda c: ["fit", "--data", c["data"], "--epochs", "0", "--no-progress"],
        details="epochs must be at least 1, got 0",
    ),
    cli_case(
        "eval-unknown-kind",
        lambda c: ["eval", "--data", c["data"], "--kinds", "identity,bogus", "--no-progress"],
        details="unknown head kind.*bogus",
    ),
    cli_case(
        "eval-no-kind",
        lambda c: ["eval", "--data", c["data"], "--kinds", ",", "--no-progress"],
        details="names no head kind",
    ),
    cli_case(
        "serve-max-k-zero",
        lambda c: ["serve", "--data", c["data"], "--port", "0", "--max-k", "0"],
        details="max_k must be a positive integer",
    ),
    cli_case(
        "serve-api-keys-not-a-key-file",
        lambda c: ["serve", "--data", c["data"], "--port", "0", "--api-keys", c["notes"]],
        details="cannot read API keys from",
    ),
    cli_case(
        "serve-public-host-without-keys",
        lambda c: ["serve", "--data", c["data"], "--port", "0", "--host", "0.0.0.0"],
        details="refusing to bind 0.0.0.0 without API keys",
    ),
    cli_case(
        "serve-tls-cert-without-key",
        lambda c: ["serve", "--data", c["data"], "--port", "0", "--tls-cert", c["notes"]],
        details="--tls-key",
    ),
    cli_case(
        "serve-tls-cert-not-pem",
        lambda c: ["serve", "--data", c["data"], "--port", "0", "--tls-cert", c["notes"], "--tls-key", c["notes"]],
        details="PEM|certificate",
    ),
    cli_case(
        "serve-port-in-use", lambda c: ["serve", "--data", c["data"], "--port", str(c["busy_port"])], details="in use"
    ),
    cli_case(
        "keys-add-file-not-a-key-file",
        lambda c: ["keys", "add", "--file", c["not_json"], "--name", "a", "--role", "search"],
        details="cannot read API keys from",
    ),
    cli_case(
        "keys-add-folder-missing",
        lambda c: ["keys", "add", "--file", c["missing"] + "/keys.json", "--name", "a", "--role", "search"],
        details="folder .* does not exist",
    ),
    cli_case(
        "backup-out-exists",
        lambda c: ["backup", "--data", c["data"], "--out", c["empty"]],
        details="already exists: pass a new folder",
    ),
    cli_case(
        "backup-not-a-data-dir",
        lambda c: ["backup", "--data", c["empty"], "--out", c["fresh"]],
        details="not a data directory",
    ),
]

# Lines a failing command may print besides its error: log records (e.g. serve's INFO lines).
LOG_RECORD = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+ (DEBUG|INFO|WARNING) ")


# Files the CLI cases read, by name: relative path -> content (None: a folder).
CLI_FILES = {
    "notes": ("notes.txt", "plain text, not an image or a key file\n"),
    "not_json": ("not-json.jsonl", "this is not json\n"),
    "unknown_field": ("unknown-field.jsonl", json.dumps({"text": "red", "relevant": ["x"], "colour": "red"}) + "\n"),
    "string": ("string.jsonl", '"a red circle"\n'),
    "bad_weight": ("bad-weight.jsonl", json.dumps({"text": "red", "relevant": ["x"], "weight": "heavy"}) + "\n"),
    "no_captions": ("no-captions/images", None),
    "bad_captions": ("bad-captions/captions.jsonl", "{not json\n"),
    "empty": ("empty", None),
}


@pytest.fixture(scope="module")
def cli(running, indexed, world_corpus, tmp_path_factory):
    """Paths and addresses the CLI cases use; ``data`` is a copy of ``indexed``, and
    ``busy_port`` a port held by a listening socket."""
    root = tmp_path_factory.mktemp("cli-errors")
    shutil.copytree(indexed, root / "data")
    paths = {}
    for name, (relative, content) in CLI_FILES.items():
        path = root / relative
        if content is None:
            path.mkdir(parents=True)
        else:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(content)
        paths[name] = str(path)
    paths["no_captions"] = str(root / "no-captions")
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    yield {
        **paths,
        "server": running.server.address,
        "dead": "127.0.0.1:1",
        "data": str(root / "data"),
        "missing": str(root / "missing"),
        "corpus": str(world_corpus),
        "busy_port": busy.getsockname()[1],
    }
    busy.close()


@pytest.mark.parametrize(("args", "usage", "details"), CLI_CASES)
def test_bad_cli_input_exits_2_with_one_line(cli, tmp_path, args, usage, details):
    argv = args({**cli, "fresh": str(tmp_path / "fresh")})
    command = argv[0]
    done = subprocess.run(xmodal_cmd(*argv), capture_output=True, text=True, timeout=180, env=OFFLINE)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 2, (done.returncode, done.stderr)
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    if usage:
        assert lines[0].startswith(f"usage: xmodal {command}"), done.stderr
        lines = lines[-1:]
    else:
        lines = [line for line in lines if not LOG_RECORD.match(line)]
    assert len(lines) == 1 and lines[0].startswith(f"xmodal {command}: "), done.stderr
    assert re.search(details, lines[0]), lines[0]


# -- the library: bad arguments are xmodal errors (InvalidArgument is also a ValueError) --------
def _bad_library_calls(tmp_path):
    import numpy as np

    from xmodal.indexer import pretrain, world
    from xmodal.indexer.evaluate import retrieval_metrics
    from xmodal.indexer.losses import InfoNCELoss
    from xmodal.indexer.store import BaseStore

    scene = world.scenes(1)[0]
    config = tmp_path / pretrain.CONFIG_NAME
    config.write_text("{not json")
    return {
        "infonce-temperature": (lambda: InfoNCELoss(temperature=0), "temperature must be in"),
        "metrics-relevance-count": (
            lambda: retrieval_metrics(np.zeros((2, 4)), np.zeros((3, 4)), [{0}]),
            "one set of relevant gallery rows per query",
        ),
        "world-caption-phrasing": (lambda: world.caption(scene, "shouting"), "unknown phrasing"),
        "world-render-style": (lambda: world.render(scene, "user"), "unknown style"),
        "store-ids-vectors": (
            lambda: BaseStore(tmp_path / "base", None).append("image", ["a"], np.zeros((2, 4))),
            "1 ids for 2 vectors: pass one id per vector row",
        ),
        "pretrain-steps": (lambda: pretrain.pretrain(tmp_path, steps=0), "steps must be a positive integer"),
        "pretrain-config-json": (lambda: pretrain.load_config(tmp_path), "is not valid JSON"),
    }


@pytest.mark.parametrize(
    "name",
    [
        "infonce-temperature",
        "metrics-relevance-count",
        "world-caption-phrasing",
        "world-render-style",
        "store-ids-vectors",
        "pretrain-steps",
        "pretrain-config-json",
    ],
)
def test_library_bad_argument_is_invalid_argument(tmp_path, name):
    from xmodal.indexer.errors import InvalidArgument

    call, message = _bad_library_calls(tmp_path)[name]
    with pytest.raises(InvalidArgument, match=message) as info:
        call()
    assert info.value.code == "INVALID_ARGUMENT" and isinstance(info.value, ValueError)


def test_add_key_refuses_a_bad_key_file_with_an_xmodal_error(tmp_path):
    from xmodal.indexer.errors import InvalidArgument
    from xmodal.server.auth import add_key

    (tmp_path / "keys.json").write_text('{"keys": 3')
    with pytest.raises(InvalidArgument, match="cannot read API keys from"):
        add_key(tmp_path / "keys.json", "a", "search")
    with pytest.raises(InvalidArgument, match="does not exist: create it"):
        add_key(tmp_path / "missing" / "keys.json", "a", "search")


def test_client_refuses_bad_arguments_before_calling(running, tmp_path):
    from xmodal import client as xc

    with pytest.raises(xc.InvalidArgument, match="is empty: pass host:port"):
        xc.SearchClient(" ")
    client = running.client
    with pytest.raises(xc.InvalidArgument, match="cannot read the query image"):
        client.search(image=tmp_path / "missing.png")
    with pytest.raises(xc.InvalidArgument, match="image must be the encoded bytes or a file path, got int"):
        client.search(image=5)
    with pytest.raises(xc.InvalidArgument, match="cannot read the PEM file"):
        xc.SearchClient("127.0.0.1:1", tls=True, ca_cert=tmp_path / "missing.pem")
    with pytest.raises(xc.InvalidArgument, match="bad argument in SearchRequest"):
        client.search(text="red", k="5")
    with pytest.raises(xc.InvalidArgument, match="relevant must be item id strings"):
        client.submit_feedback(text="red", relevant=[1])
    with pytest.raises(xc.InvalidArgument, match="bad argument in SubmitFeedbackRequest"):
        client.submit_feedback(text="red", relevant=["x"], weight="heavy")
    # one id given as a string is one id, not its characters
    with pytest.raises(xc.NotFound, match="'no-such-item'"):
        client.submit_feedback(text="red", relevant="no-such-item")
