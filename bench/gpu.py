"""CPU against GPU, side by side in one run: encoder images/s at indexing batch sizes, and
single-query text and image encode latency (p50/p99).

Run it on a machine with a CUDA GPU (random weights need no download):

    python bench/gpu.py --model ViT-B-32 --pretrained none [--roco ../shared/data/roco-ccby] [--device cuda:0]

Images are ROCO's when --roco is given (decoded and preprocessed once, before timing), else
seeded random tensors of the model's input size. Without CUDA it says so and exits 2.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

from xmodal.indexer.encoder import load_encoder


def images(encoder, roco: str | None, n: int) -> torch.Tensor:
    if roco:
        from PIL import Image

        rows = [json.loads(line) for line in (Path(roco) / "captions.jsonl").read_text().splitlines()[:n]]
        return torch.stack([encoder.image_tensor(Image.open(Path(roco) / r["image"]).convert("RGB")) for r in rows])
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, encoder.image_size, encoder.image_size, generator=generator)


def images_per_s(encoder, pixels: torch.Tensor, batch: int) -> float:
    encoder.encode_image_tensors(pixels[:batch])  # warm-up (and CUDA kernels chosen)
    started = time.perf_counter()
    for start in range(0, len(pixels), batch):
        encoder.encode_image_tensors(pixels[start : start + batch])
    return len(pixels) / (time.perf_counter() - started)


def latency(call, repeats: int) -> dict[str, float]:
    call()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        times.append((time.perf_counter() - t0) * 1e3)
    return {"p50_ms": float(np.percentile(times, 50)), "p99_ms": float(np.percentile(times, 99))}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--pretrained", default="none")
    parser.add_argument("--device", default="cuda:0")
    parser.add_argument("--roco", default=None)
    parser.add_argument("--images", type=int, default=512)
    parser.add_argument("--cpu-images", type=int, default=128, help="images timed on the CPU (it is slower)")
    parser.add_argument("--repeats", type=int, default=50)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("bench/gpu.py: torch sees no CUDA device on this machine; run it where there is one", file=sys.stderr)
        return 2
    devices = {
        "cpu": load_encoder(args.model, args.pretrained),
        "gpu": load_encoder(args.model, args.pretrained, device=args.device),
    }
    pixels = images(devices["cpu"], args.roco, args.images)
    query = "chest x-ray with a left pneumothorax and a chest tube in place"
    report: dict = {"model": f"{args.model} / {args.pretrained}", "gpu": torch.cuda.get_device_name(args.device)}
    for name, encoder in devices.items():
        count = args.cpu_images if name == "cpu" else args.images
        batch = 64 if name == "cpu" else 256
        report[name] = {
            f"index images/s (batch {batch})": images_per_s(encoder, pixels[:count], batch),
            "text query": latency(lambda e=encoder: e.encode_texts([query]), args.repeats),
            "image query": latency(lambda e=encoder: e.encode_image_tensors(pixels[:1]), args.repeats),
        }
    cpu_rate, gpu_rate = (next(iter(report[d].values())) for d in ("cpu", "gpu"))
    report["gpu/cpu images/s"] = gpu_rate / cpu_rate
    agree = np.sum(devices["gpu"].encode_texts([query]) * devices["cpu"].encode_texts([query]))
    report["text vector cosine gpu (fp16 autocast) vs cpu"] = float(agree)
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
