"""Query speed, side by side in one run: today's path against the fast paths.

1. Encode latency of one query (p50/p99), the runtimes interleaved call by call so that a
   busy machine slows them alike: text by fp32 torch at full context length (the path before
   issue 11), torch cut after the end-of-text token, ONNX Runtime fp32 and int8; images by
   torch, ONNX fp32 and int8.
2. Quality of each runtime against fp32 torch: top-10 agreement of ROCO caption queries (and
   image queries) searched against torch's vectors of the ROCO images (captions), for the
   benchmark model and for the shipped xmodal-demo; and the xmodal-demo's zero-shot held-out
   recall@10 on the generated world's target ("site") style, by runtime.
3. End to end on a real gRPC server over ROCO indexed with the benchmark model: Search p50/p99
   and queries/s with 1 and 16 clients, today's path (full-length torch, one encode at a
   time, no cache) against the fast one (--query-runtime, micro-batching), then the cache off
   and on with queries drawn from a Zipf law over 1,000 distinct queries. The clients run in
   a process of their own (threads, one channel each), the server in the bench's. The
   configurations take turns over ``--rounds`` rounds (the order rotating); each figure is
   the median of its rounds, and each ratio to today's is taken within a round.

    nice -n 10 python bench/query_speed.py --model ViT-B-32 --pretrained none \
        --roco ../shared/data/roco-ccby [--runtime onnx-int8] [--out bench/out/query_speed.json]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from xmodal.client import SearchClient
from xmodal.indexer import world
from xmodal.indexer.encoder import DEMO_MODEL, default_threads, load_encoder
from xmodal.indexer.evaluate import retrieval_metrics
from xmodal.indexer.onnx_encoder import OnnxEncoder, exported
from xmodal.indexer.pipeline import index_corpus
from xmodal.indexer.train import FitConfig
from xmodal.server.batcher import QueryEncoding
from xmodal.server.engine import SearchEngine
from xmodal.server.service import Server


def pct(values, q) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


def roco_records(root: Path, n: int) -> list[dict]:
    rows = [json.loads(line) for line in (root / "captions.jsonl").read_text().splitlines() if line.strip()]
    return rows[:n]


def interleaved(calls: dict, repeats: int) -> dict[str, dict[str, float]]:
    """p50/p99 (ms) of each named call, run round-robin ``repeats`` times after one warm-up."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call(0)
    for i in range(repeats):
        for name, call in calls.items():
            t0 = time.perf_counter()
            call(i)
            times[name].append((time.perf_counter() - t0) * 1e3)
    return {name: {"p50_ms": pct(t, 50), "p99_ms": pct(t, 99)} for name, t in times.items()}


def full_length(encoder):
    """Today's text path: the whole context, fp32 torch."""

    def encode(texts):
        encoder.truncate_text = False
        try:
            return encoder.encode_texts(texts)
        finally:
            encoder.truncate_text = True

    return encode


def top10_agreement(queries: dict[str, np.ndarray], gallery: np.ndarray) -> dict[str, float]:
    """Mean overlap of each runtime's top 10 with torch's (queries["torch"])."""
    k = min(10, len(gallery))
    top = {name: np.argsort(-(q @ gallery.T), axis=1)[:, :k] for name, q in queries.items()}
    return {
        name: float(np.mean([len(set(a) & set(b)) / k for a, b in zip(top[name], top["torch"], strict=True)]))
        for name in queries
        if name != "torch"
    }


def encoders_of(model: str, pretrained: str | None, cache: Path | None, threads: int):
    base = load_encoder(model, pretrained, threads=threads)
    folder = exported(base, cache)
    passes = QueryEncoding.passes
    return base, {r: OnnxEncoder(base, r, folder, threads, passes) for r in ("onnx", "onnx-int8")}


def quality(base, fast: dict, texts: list[str], pixels: torch.Tensor) -> dict:
    text_q = {"torch": base.encode_texts(texts), **{r: e.encode_texts(texts) for r, e in fast.items()}}
    image_q = {
        "torch": base.encode_image_tensors(pixels),
        **{r: e.encode_image_tensors(pixels) for r, e in fast.items()},
    }
    return {
        "text->image top-10 agreement": top10_agreement(text_q, image_q["torch"]),
        "image->text top-10 agreement": top10_agreement(image_q, text_q["torch"]),
    }


def target_recall(base, fast: dict, n: int) -> dict[str, dict[str, float]]:
    """Zero-shot held-out recall@10 on the generated target style, queries by each runtime
    against torch's gallery."""
    scenes = world.scenes(n, seed=7)
    texts = [world.caption(s, "target") for s in scenes]
    pixels = torch.stack(
        [base.image_tensor(world.render(s, "target", 64, seed=700_000 + i)) for i, s in enumerate(scenes)]
    )
    gallery_image, gallery_text = base.encode_image_tensors(pixels), base.encode_texts(texts)
    relevant = [{i} for i in range(n)]
    out = {}
    for name, encoder in {"torch": base, **fast}.items():
        t2i = retrieval_metrics(encoder.encode_texts(texts), gallery_image, relevant)["recall@10"]
        i2t = retrieval_metrics(encoder.encode_image_tensors(pixels), gallery_text, relevant)["recall@10"]
        out[name] = {"text->image recall@10": t2i, "image->text recall@10": i2t}
    return out


class LiveServer:
    def __init__(self, data: Path, encoder, query_encoder, encoding: QueryEncoding):
        self.engine = SearchEngine(data, encoder, query_encoder=query_encoder, encoding=encoding)
        self.engine.load_current()
        self.server = Server(self.engine, host="127.0.0.1", port=0, max_workers=32, max_concurrent=256).start()

    def close(self) -> None:
        self.server.stop(grace=1)
        self.engine.close()


def drive(address: str, queries: list[str], clients: int) -> dict[str, float]:
    """Send ``queries`` from ``clients`` threads (each its own channel) of a separate client
    process, as frontends are: the clients' own Python work does not hold the server's GIL.
    Latency and queries/s."""
    import multiprocessing as mp

    context = mp.get_context("spawn")  # no fork of a process that holds gRPC and torch threads
    receive, send = context.Pipe(duplex=False)
    process = context.Process(target=_client_process, args=(address, queries, clients, send))
    process.start()
    send.close()
    try:
        figures = receive.recv()
    except EOFError:
        raise SystemExit(f"the client process failed (exit status {process.exitcode})") from None
    process.join()
    return figures


def _client_process(address: str, queries: list[str], clients: int, send) -> None:
    latencies: list[float] = []
    lock = threading.Lock()
    shares = [queries[i::clients] for i in range(clients)]
    stubs = [SearchClient(address, timeout=600) for _ in range(clients)]
    for stub in stubs:
        stub.search(text="warm-up", k=10)
    barrier = threading.Barrier(clients)

    def client(i: int) -> None:
        barrier.wait()
        for text in shares[i]:
            t0 = time.perf_counter()
            stubs[i].search(text=text, k=10)
            with lock:
                latencies.append((time.perf_counter() - t0) * 1e3)

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    elapsed = time.perf_counter() - started
    for stub in stubs:
        stub.close()
    send.send({"p50_ms": pct(latencies, 50), "p99_ms": pct(latencies, 99), "qps": len(latencies) / elapsed})
    send.close()


def zipf_queries(distinct: list[str], n: int, s: float, seed: int) -> list[str]:
    weights = 1.0 / np.arange(1, len(distinct) + 1) ** s
    rng = np.random.default_rng(seed)
    return [distinct[i] for i in rng.choice(len(distinct), size=n, p=weights / weights.sum())]


def build_data(data: Path, roco: Path, records: list[dict], encoder) -> None:
    corpus = data.parent / "corpus"
    (corpus / "images").mkdir(parents=True, exist_ok=True)
    for r in records:
        target = corpus / r["image"]
        if not target.exists():
            os.symlink((roco / r["image"]).resolve(), target)
    (corpus / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    index_corpus(corpus, data, encoder, head=FitConfig(kind="identity"), progress=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--roco", default=os.environ.get("XMODAL_ROCO_DIR", "../shared/data/roco-ccby"))
    parser.add_argument("--runtime", default="onnx-int8", choices=("torch", "onnx", "onnx-int8"))
    parser.add_argument("--repeats", type=int, default=40, help="single-query encodes per path")
    parser.add_argument("--quality-n", type=int, default=300, help="ROCO pairs for the agreement figures")
    parser.add_argument("--corpus-n", type=int, default=200, help="ROCO pairs indexed for the end-to-end runs")
    parser.add_argument("--searches", type=int, default=192, help="searches per end-to-end run")
    parser.add_argument("--batch-max", type=int, default=QueryEncoding.max_batch)
    parser.add_argument("--batch-wait-ms", type=float, default=QueryEncoding.max_wait_ms)
    parser.add_argument("--threads", type=int, default=default_threads())
    parser.add_argument("--rounds", type=int, default=3, help="end-to-end rounds, the configurations' order rotating")
    parser.add_argument(
        "--compare-passes",
        action="store_true",
        help="also run the fast path with one encoder pass at a time and batches of 16 (the defaults before "
        "--encode-passes)",
    )
    parser.add_argument("--onnx-cache", type=Path, default=None, help="where exported models are kept")
    parser.add_argument(
        "--phases", default="encode,quality,search", help="which parts to run (comma-separated; default all)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench/out/query_speed.json"))
    args = parser.parse_args()
    roco = Path(args.roco)
    report: dict = {
        "machine": {
            "cpu": next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if "model name" in line), "?"),
            "cores": default_threads(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_average_at_start": os.getloadavg(),
        },
        "model": f"{args.model} / {args.pretrained}",
    }
    t0 = time.time()
    base, fast = encoders_of(args.model, args.pretrained, args.onnx_cache, args.threads)
    report["load_and_export_s"] = time.time() - t0
    records = roco_records(roco, max(args.quality_n, args.corpus_n))
    texts = [r["caption"] for r in records]
    pixels = torch.stack(
        [base.image_tensor(Image.open(roco / r["image"]).convert("RGB")) for r in records[: args.quality_n]]
    )
    print(f"loaded and exported in {report['load_and_export_s']:.0f} s; load average {os.getloadavg()}", flush=True)

    phases = set(args.phases.split(","))
    if "encode" in phases:
        encode_latency(report, base, fast, texts, pixels, args)
    if "quality" in phases:
        measure_quality(report, base, fast, texts, pixels, records, roco, args)
    if "search" in phases:
        end_to_end(report, base, fast, texts, records, roco, args)
    report["load_average_at_end"] = os.getloadavg()
    save(report, args.out)
    print(f"written to {args.out}")


def encode_latency(report, base, fast, texts, pixels, args) -> None:
    """1. encode latency, one query at a time"""
    today = full_length(base)

    def text_call(encode: Callable) -> Callable[[int], object]:
        return lambda i: encode([texts[i % len(texts)]])

    def image_call(encoder) -> Callable[[int], object]:
        return lambda i: encoder.encode_image_tensors(pixels[i % len(pixels)][None])

    text_calls = {
        "torch fp32, full length (today)": text_call(today),
        "torch fp32, cut at end-of-text": text_call(base.encode_texts),
        **{f"{r}, cut at end-of-text": text_call(e.encode_texts) for r, e in fast.items()},
    }
    report["text_encode"] = interleaved(text_calls, args.repeats)
    image_calls = {"torch fp32 (today)": image_call(base), **{r: image_call(e) for r, e in fast.items()}}
    report["image_encode"] = interleaved(image_calls, max(10, args.repeats // 2))
    save(report, args.out)
    print(json.dumps({k: report[k] for k in ("text_encode", "image_encode")}, indent=1), flush=True)


def measure_quality(report, base, fast, texts, pixels, records, roco, args) -> None:
    """2. quality against fp32 torch"""
    quality_texts = texts[: args.quality_n]
    report["quality"] = {args.model: quality(base, fast, quality_texts, pixels)}
    demo, demo_fast = encoders_of(DEMO_MODEL, None, args.onnx_cache, args.threads)
    demo_pixels = torch.stack(
        [demo.image_tensor(Image.open(roco / r["image"]).convert("RGB")) for r in records[: args.quality_n]]
    )
    report["quality"][DEMO_MODEL] = quality(demo, demo_fast, quality_texts, demo_pixels)
    report["quality"][DEMO_MODEL]["target-style held-out recall@10"] = target_recall(demo, demo_fast, 300)
    print(json.dumps(report["quality"], indent=1), flush=True)
    save(report, args.out)


def end_to_end(report, base, fast, texts, records, roco, args) -> None:
    """3. end to end"""
    with tempfile.TemporaryDirectory(prefix="xmodal-qs-") as tmp:
        data = Path(tmp) / "data"
        build_data(data, roco, records[: args.corpus_n], base)
        plain = [f"{t} ({i})" for i, t in enumerate(texts)]  # distinct
        queries = (plain * (args.searches // len(plain) + 1))[: args.searches]
        configs = {
            "today (torch full length, one at a time, no cache)": (
                None,
                QueryEncoding(runtime="torch", max_batch=1, cache_size=0),
                True,
            ),
            f"fast ({args.runtime}, batch {args.batch_max} / {args.batch_wait_ms} ms, "
            f"{QueryEncoding.passes} passes at once, no cache)": (
                fast.get(args.runtime, base),
                QueryEncoding(
                    runtime=args.runtime, max_batch=args.batch_max, max_wait_ms=args.batch_wait_ms, cache_size=0
                ),
                False,
            ),
        }
        if args.compare_passes and args.runtime != "torch":
            one_pass = OnnxEncoder(base, args.runtime, exported(base, args.onnx_cache), args.threads, 1)
            configs[f"fast, 1 pass at a time ({args.runtime}, batch 16, the first defaults)"] = (
                one_pass,
                QueryEncoding(
                    runtime=args.runtime,
                    max_batch=16,
                    max_wait_ms=args.batch_wait_ms,
                    cache_size=0,
                    passes=1,
                ),
                False,
            )
        report["search"] = {}
        report["search_rounds"] = args.rounds
        for clients in (1, 16):
            rounds: dict[str, list[dict]] = {name: [] for name in configs}
            for r in range(args.rounds):
                names = list(configs)
                names = names[r % len(names) :] + names[: r % len(names)]  # a busy moment falls on each in turn
                for name in names:
                    query_encoder, encoding, old_text_path = configs[name]
                    base.truncate_text = not old_text_path
                    server = LiveServer(data, base, query_encoder, encoding)
                    try:
                        share = queries if clients > 1 else queries[: max(16, args.searches // 4)]
                        figures = drive(server.server.address, share, clients)
                    finally:
                        server.close()
                        base.truncate_text = True
                    rounds[name].append(figures)
                    print(f"round {r + 1}, {clients:>2} client(s), {name}: {figures}", flush=True)
            today = rounds[next(iter(configs))]
            for name, runs in rounds.items():
                summary: dict[str, Any] = {
                    key: float(np.median([run[key] for run in runs])) for key in ("p50_ms", "p99_ms", "qps")
                }
                summary["rounds"] = runs
                summary["qps_vs_today_per_round"] = [run["qps"] / t["qps"] for run, t in zip(runs, today, strict=True)]
                summary["p99_vs_today_per_round"] = [
                    run["p99_ms"] / t["p99_ms"] for run, t in zip(runs, today, strict=True)
                ]
                report["search"][f"{clients} client(s), {name}"] = summary
            save(report, args.out)
        distinct = [r["caption"] for r in roco_records(roco, 1000)]
        zipf = zipf_queries(distinct, args.searches * 2, 1.1, seed=0)
        report["cache"] = {"distinct queries": len(distinct), "searches": len(zipf), "zipf s": 1.1}
        for size in (0, 10_000):
            encoding = QueryEncoding(
                runtime=args.runtime, max_batch=args.batch_max, max_wait_ms=args.batch_wait_ms, cache_size=size
            )
            server = LiveServer(data, base, fast.get(args.runtime, base), encoding)
            try:
                figures = drive(server.server.address, zipf, 16)
                figures["hit_rate"] = server.engine.queries.cache.hit_rate
            finally:
                server.close()
            report["cache"][f"cache {'on' if size else 'off'} (16 clients)"] = figures
            print(f"cache {size}: {figures}", flush=True)
            save(report, args.out)


def save(report: dict, out: Path) -> None:
    """Write what has been measured so far (a long run that stops keeps its figures)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
