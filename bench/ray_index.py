"""Indexing throughput on Ray vs the local pipeline, side by side on the same cores.

Three ways to embed the same ROCO images (an image-only manifest, so the embed step is
all images), each on a fresh data directory with an identity head, every round:

- local: ``index_corpus`` as ``xmodal index`` runs it (decoding threads + the encoder);
- Ray, 1 worker: ``--ray --ray-workers 1`` on a local Ray with this machine's cores, one
  encoder actor holding them all (the default layout before one actor per core);
- Ray, 2 workers: two actors of half the cores each (``--ray`` on a 2-core machine: the
  default layout, one actor per core as memory allows, printed at the start).

Ray's rate is taken over the whole embed step (actor start-up and model load included:
what a run pays), and without the actors' start-up, measured apart in the same run: the
time for 1 (or 2) actors of the same size to start and load the model, with nothing else
to do. The local Ray is started once, before the rounds (``ray.init`` is paid once per
cluster, not per run); its start-up time is printed. The order of the three rotates each round, so a busy moment of
the machine does not always fall on the same one.

    nice -n 10 .venv/bin/python bench/ray_index.py --roco ../shared/data/roco-ccby --images 384 --rounds 2
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
from typing import Any

import torch

from xmodal.indexer.encoder import load_encoder
from xmodal.indexer.pipeline import index_corpus
from xmodal.indexer.ray_pipeline import RayEmbedder, RayOptions, _layout, actor_bytes, import_ray
from xmodal.indexer.train import FitConfig

WAYS = ("local", "ray-1", "ray-2")


def write_manifest(folder: Path, records: list[dict], roco: Path) -> Path:
    manifest = folder / "images.jsonl"
    with open(manifest, "w") as handle:
        for record in records:
            handle.write(json.dumps({"type": "image", "id": record["id"], "path": str(roco / record["image"])}) + "\n")
    return manifest


class _Probe:
    """An actor that only loads the encoder: how long an encoder actor takes to start."""

    def __init__(self, model: str, pretrained: str | None, threads: int):
        load_encoder(model, pretrained, threads=threads)

    def ready(self) -> bool:
        return True


def actor_start_up(ray, model: str, pretrained: str | None, workers: int, cores: int) -> float:
    cpus = cores // workers
    started = time.perf_counter()
    probes = [ray.remote(num_cpus=cpus)(_Probe).remote(model, pretrained, cpus) for _ in range(workers)]
    ray.get([probe.ready.remote() for probe in probes])
    seconds = time.perf_counter() - started
    for probe in probes:
        ray.kill(probe)
    return seconds


def one_run(way: str, manifest: Path, encoder, batch_size: int, cores: int, start_up: dict[str, float]) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        options: dict[str, Any] = {"batch_size": batch_size, "progress": False, "head": FitConfig(kind="identity")}
        if way == "local":
            report = index_corpus(manifest, Path(tmp) / "data", encoder, **options)
            return {"rate": report.embedded["image"] / report.image_seconds, "seconds": report.image_seconds}
        workers = int(way.split("-")[1])
        ray_options = RayOptions(workers=workers, cpus_per_worker=cores // workers)
        with RayEmbedder(ray_options) as embedder:
            report = index_corpus(manifest, Path(tmp) / "data", encoder, ray=embedder, **options)
        timings = embedder.timings
        images = report.embedded["image"]
        return {
            "rate": images / timings.seconds,
            "seconds": timings.seconds,
            "first_result": timings.first_result,
            "after_start_up": images / max(1e-9, timings.seconds - start_up[way]),
        }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--roco", default=os.environ.get("XMODAL_ROCO_DIR", "../shared/data/roco-ccby"))
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default="none", help="'none' = random weights (no download)")
    parser.add_argument("--images", type=int, default=384, help="ROCO images per run (default 384)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", default=None, help="write the figures as JSON here")
    args = parser.parse_args(argv)
    roco = Path(args.roco).resolve()
    if not (roco / "captions.jsonl").is_file():
        print(f"no ROCO corpus at {roco}: pass --roco or set XMODAL_ROCO_DIR", file=sys.stderr)
        return 2
    records = [json.loads(line) for line in (roco / "captions.jsonl").read_text().splitlines()][: args.images]
    cores = os.cpu_count() or 1
    encoder = load_encoder(args.model, args.pretrained)
    ray = import_ray()
    started = time.perf_counter()
    ray.init(num_cpus=cores, include_dashboard=False, logging_level="WARNING")
    ray_start = time.perf_counter() - started
    print(
        f"model {encoder.identity}, {len(records)} ROCO images, batch {args.batch_size}, {cores} cores, "
        f"{platform.processor() or platform.machine()}, torch threads {torch.get_num_threads()}, "
        f"ray {ray.__version__} (local Ray started in {ray_start:.1f} s), load average {os.getloadavg()[0]:.1f}"
    )
    default = _layout(ray, RayOptions(), actor_bytes(encoder.model))
    print(f"default layout here: {default.workers} actor(s) of {default.cpus:g} CPU")
    start_up = {way: actor_start_up(ray, args.model, args.pretrained, int(way[-1]), cores) for way in WAYS[1:]}
    print("encoder actors' start-up alone: " + ", ".join(f"{way} {s:.1f} s" for way, s in start_up.items()))
    results: dict[str, list[dict]] = {way: [] for way in WAYS}
    with tempfile.TemporaryDirectory() as tmp:
        manifest = write_manifest(Path(tmp), records, roco)
        for round_no in range(args.rounds):
            order = WAYS[round_no % 3 :] + WAYS[: round_no % 3]
            for way in order:
                results[way].append(one_run(way, manifest, encoder, args.batch_size, cores, start_up))
            local = results["local"][-1]["rate"]
            cells = [f"local {local:.2f} img/s"]
            for way in WAYS[1:]:
                r = results[way][-1]
                cells.append(
                    f"{way} {r['rate']:.2f} img/s ({r['rate'] / local:.3f}x; without start-up "
                    f"{r['after_start_up']:.2f} img/s = {r['after_start_up'] / local:.3f}x; "
                    f"first batch back after {r['first_result']:.1f} s)"
                )
            print(f"round {round_no + 1} ({' -> '.join(order)}): " + "; ".join(cells), flush=True)
    ray.shutdown()
    mean = {way: sum(r["rate"] for r in runs) / len(runs) for way, runs in results.items()}
    warm = {way: sum(r["after_start_up"] for r in runs) / len(runs) for way, runs in results.items() if way != "local"}
    print("\nmean over rounds (ratio to local; goal >= 0.85):")
    print(f"  local  {mean['local']:.2f} img/s")
    for way in WAYS[1:]:
        print(
            f"  {way}  {mean[way]:.2f} img/s whole step ({mean[way] / mean['local']:.3f}x), "
            f"{warm[way]:.2f} img/s without the actors' start-up ({warm[way] / mean['local']:.3f}x)"
        )
    if args.out:
        figures = {
            "ray_start_seconds": ray_start,
            "default_layout": {"workers": default.workers, "cpus": default.cpus},
            "actor_start_up_seconds": start_up,
            "runs": results,
        }
        Path(args.out).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
