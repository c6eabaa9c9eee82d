"""The committed gRPC stubs must be exactly what protoc makes from the committed .proto."""

from __future__ import annotations

import shutil
import subprocess
import sys

from conftest import REPO

GENERATED = ("xmodal_pb2.py", "xmodal_pb2.pyi", "xmodal_pb2_grpc.py")


def test_committed_stubs_are_fresh(tmp_path):
    (tmp_path / "xmodal" / "v1").mkdir(parents=True)
    shutil.copy(REPO / "proto" / "xmodal" / "v1" / "xmodal.proto", tmp_path / "xmodal" / "v1")
    subprocess.run(
        [
            sys.executable,
            "-m",
            "grpc_tools.protoc",
            "-I",
            str(tmp_path),
            f"--python_out={tmp_path}",
            f"--pyi_out={tmp_path}",
            f"--grpc_python_out={tmp_path}",
            "xmodal/v1/xmodal.proto",
        ],
        check=True,
        cwd=tmp_path,
    )
    stale = [
        name
        for name in GENERATED
        if (tmp_path / "xmodal" / "v1" / name).read_bytes() != (REPO / "proto" / "xmodal" / "v1" / name).read_bytes()
    ]
    assert not stale, f"stale stubs {stale}: run `make proto` and commit the result"


def test_contract_names():
    from xmodal.v1 import xmodal_pb2 as pb

    assert pb.DESCRIPTOR.package == "xmodal.v1"
    methods = {m.name for m in pb.DESCRIPTOR.services_by_name["SearchService"].methods}
    assert {"Search", "GetItems", "GetStatus"} <= methods
    assert [v.name for v in pb.Modality.DESCRIPTOR.values] == [
        "MODALITY_UNSPECIFIED",
        "MODALITY_IMAGE",
        "MODALITY_TEXT",
    ]
    assert [f.name for f in pb.Query.DESCRIPTOR.oneofs_by_name["kind"].fields] == ["text", "image", "item_id"]
