"""The client package stays light: grpc and protobuf, never torch or faiss."""

from __future__ import annotations

import subprocess
import sys


def test_client_imports_neither_torch_nor_faiss():
    code = (
        "import sys, xmodal.client as c\n"
        "heavy = [m for m in ('torch', 'faiss', 'open_clip', 'xmodal.indexer', 'xmodal.server') if m in sys.modules]\n"
        "print(heavy, sorted(c.__all__)[:3])"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.startswith("[] ")
