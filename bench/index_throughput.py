"""Indexing throughput: the real pipeline vs the bare encoder forward pass.

Both sides use the same model, the same batch size and the same ROCO images:

- bare: images decoded and preprocessed beforehand, then only
  ``encoder.encode_image_tensors`` timed, batch after batch;
- pipeline: ``index_corpus`` on a fresh data directory (files read, decoded and
  preprocessed in worker threads while the encoder runs, fp16 shards and catalog rows
  committed), timed over its image phase.

The ratio pipeline / bare is the share of the encoder's speed the pipeline keeps
(target: >= 0.9 with ViT-B-32).

    python bench/index_throughput.py --roco ../shared/data/roco-ccby [--model ViT-B-32 --pretrained none]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from xmodal.indexer.encoder import load_encoder
from xmodal.indexer.images import decode_image
from xmodal.indexer.pipeline import index_corpus
from xmodal.indexer.train import FitConfig


def bare_forward(encoder, paths, batch_size: int) -> float:
    tensors = [encoder.image_tensor(decode_image(Path(p).read_bytes())) for p in paths]
    started = time.perf_counter()
    for start in range(0, len(tensors), batch_size):
        encoder.encode_image_tensors(torch.stack(tensors[start : start + batch_size]))
    return len(tensors) / (time.perf_counter() - started)


def pipeline(encoder, records, roco: Path, batch_size: int) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        corpus.mkdir()
        with open(corpus / "captions.jsonl", "w") as handle:
            for record in records:
                handle.write(json.dumps({**record, "image": str(roco / record["image"])}) + "\n")
        # identity head: this measures indexing, not head fitting
        report = index_corpus(
            corpus, Path(tmp) / "data", encoder, batch_size=batch_size, progress=False, head=FitConfig(kind="identity")
        )
        return report.embedded["image"] / report.image_seconds, report.seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--roco", default=os.environ.get("XMODAL_ROCO_DIR", "../shared/data/roco-ccby"))
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default="none", help="'none' = random weights (no download)")
    parser.add_argument("--images", type=int, default=512, help="ROCO images per run (default 512)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2, help="alternating bare/pipeline rounds (default 2)")
    args = parser.parse_args(argv)
    roco = Path(args.roco).resolve()
    if not (roco / "captions.jsonl").is_file():
        print(f"no ROCO corpus at {roco}: pass --roco or set XMODAL_ROCO_DIR", file=sys.stderr)
        return 2
    records = [json.loads(line) for line in (roco / "captions.jsonl").read_text().splitlines()][: args.images]
    encoder = load_encoder(args.model, args.pretrained)
    print(
        f"model {encoder.identity}, {len(records)} ROCO images, batch {args.batch_size}, "
        f"torch threads {torch.get_num_threads()}, {os.cpu_count()} cores, {platform.processor() or platform.machine()}"
    )
    bare_forward(encoder, [roco / r["image"] for r in records[: args.batch_size]], args.batch_size)  # warm-up
    bare_rates, pipe_rates = [], []
    for round_no in range(args.rounds):
        bare_rates.append(bare_forward(encoder, [roco / r["image"] for r in records], args.batch_size))
        rate, total = pipeline(encoder, records, roco, args.batch_size)
        pipe_rates.append(rate)
        print(
            f"round {round_no + 1}: bare forward {bare_rates[-1]:.2f} img/s, pipeline {rate:.2f} img/s "
            f"(ratio {rate / bare_rates[-1]:.3f}; whole index run incl. texts and snapshot {total:.1f} s)"
        )
    bare, pipe = sum(bare_rates) / len(bare_rates), sum(pipe_rates) / len(pipe_rates)
    print(f"\nmean: bare forward {bare:.2f} img/s, pipeline {pipe:.2f} img/s, ratio {pipe / bare:.3f} (target >= 0.9)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
