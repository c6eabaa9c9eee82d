"""Domain adaptation benchmark on the generated world's target ("site") style.

The shipped xmodal-demo model was pretrained on the source style only. Here a corpus in the
target style (greyscale, noisy, blurred pictures; clinical-register captions) is indexed
with the real pipeline, and on its held-out test pairs we compare:

- zero-shot (identity head), PCA, the linear, shared and mlp heads (fitted on the train
  pairs with early stopping on val, from cached base embeddings), and
- full fine-tuning of the tiny encoder itself on the same train pairs (the expensive
  upper bound), with its wall time.

- the paper's own setup (``paper``: Linear-ReLU-Linear to 128-d, pairwise label loss at
  temperature 0.1), the mlp with the label-aware losses on the world's labels (the shape),
  and ``live``: what the gate puts live from an mlp fit (blend chosen on validation, or
  zero-shot when the gain is within noise), with and without replay of old-style items.

Beside the table it measures a learning curve (``learning_curve``: text->image recall@10 of
zero-shot, the mlp as trained, and what the gate put live, at 50 ... 5,000 train pairs with
a validation split of an eighth of that, as a site's 80/10/10 split would give) and the
source-style retention (``source_style``: text->image recall@10 on 1,000 held-out pairs in
the style the encoder was trained on, of every head fitted on the target style).

    python bench/adaptation.py [--train 5000 --val 500 --test 1000] [--out docs/results/adaptation]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import open_clip
import torch

from xmodal.indexer import world
from xmodal.indexer.adapt import (
    TrainingData,
    bar_chart,
    fit_training_data,
    held_out_metrics,
    markdown_table,
    open_data_dir,
)
from xmodal.indexer.corpus import IMAGE, TEXT
from xmodal.indexer.encoder import DEMO_MODEL, load_encoder, resolve_model
from xmodal.indexer.evaluate import pair_metrics
from xmodal.indexer.heads import Head
from xmodal.indexer.images import decode_image
from xmodal.indexer.pipeline import index_corpus
from xmodal.indexer.train import FitConfig, pairs_from_catalog
from xmodal.indexer.vectors import load_vectors

SPLIT_SEEDS = {"train": 101, "val": 202, "test": 303}
SOURCE_SEEDS = {"test": 404, "replay": 505}  # source-style pairs: held out, and an old archive to replay
CURVE_SIZES = (50, 100, 200, 500, 1000, 2000, 5000)
# (row, config, gated, replay): head kinds as trained, then what the gate puts live
# (measured first: the headline rows; then the learning curve; then the other kinds)
VARIANTS = (
    ("identity", FitConfig(kind="identity"), False, False),
    ("mlp", FitConfig(kind="mlp"), False, False),
    ("live", FitConfig(kind="mlp"), True, False),
    ("live+replay", FitConfig(kind="mlp"), True, True),
)
OTHER_VARIANTS = (
    ("pca", FitConfig(kind="pca"), False, False),
    ("linear", FitConfig(kind="linear"), False, False),
    ("shared", FitConfig(kind="shared"), False, False),
    ("paper", FitConfig(kind="paper"), False, False),
    ("mlp+pairwise", FitConfig(kind="mlp", pairwise_weight=0.5), False, False),
    ("mlp+supcon", FitConfig(kind="mlp", supcon_weight=0.5), False, False),
)


def write_target_corpus(root: Path, sizes: dict[str, int]) -> list[dict]:
    """A captions.jsonl corpus in the target style with explicit splits."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for split, n in sizes.items():
        for i, scene in enumerate(world.scenes(n, SPLIT_SEEDS[split])):
            item_id = f"{split}-{i:05d}"
            world.render(scene, "target", 64, seed=SPLIT_SEEDS[split] * 100_000 + i).save(
                root / "images" / f"{item_id}.png"
            )
            records.append(
                {
                    "id": item_id,
                    "image": f"images/{item_id}.png",
                    "caption": world.caption(scene, "target"),
                    "split": split,
                    "label": scene.label,
                }
            )
    (root / "captions.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return records


def encode_split(model, preprocess, tokenizer, corpus: Path, records: list[dict]) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    with torch.inference_mode():
        images = torch.stack([preprocess(decode_image((corpus / r["image"]).read_bytes())) for r in records])
        image_vecs = torch.cat([model.encode_image(images[s : s + 256]) for s in range(0, len(images), 256)])
        tokens = tokenizer([r["caption"] for r in records])
        text_vecs = torch.cat([model.encode_text(tokens[s : s + 256]) for s in range(0, len(tokens), 256)])
    norm = lambda x: torch.nn.functional.normalize(x.float(), dim=-1).numpy()  # noqa: E731
    return norm(image_vecs), norm(text_vecs)


def split_metrics(image_vecs, text_vecs, records) -> dict:
    ids = [r["id"] for r in records]
    text_ids = [f"{i}#caption" for i in ids]
    groups = {t: r["caption"] for t, r in zip(text_ids, records, strict=True)}
    return pair_metrics(ids, image_vecs, text_ids, text_vecs, list(zip(ids, text_ids, strict=True)), text_groups=groups)


def finetune(
    corpus: Path, by_split: dict[str, list[dict]], *, epochs: int, batch_size: int, lr: float, patience: int = 2
) -> dict:
    """Fine-tune the whole tiny encoder (both towers) with CLIP's loss; early stopping on
    val recall@10. Wall time counts training and per-epoch validation, not the one-time
    decoding of the training images."""
    name = resolve_model(DEMO_MODEL, None).model  # "local-dir:<shipped folder>"
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    train = by_split["train"]
    images = torch.stack([preprocess(decode_image((corpus / r["image"]).read_bytes())) for r in train])
    tokens = tokenizer([r["caption"] for r in train])
    loss_fn = open_clip.ClipLoss()
    optimiser = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)

    def val_recall():
        img, txt = encode_split(model, preprocess, tokenizer, corpus, by_split["val"])
        m = split_metrics(img, txt, by_split["val"])
        return (m["text_to_image"]["recall@10"] + m["image_to_text"]["recall@10"]) / 2

    started = time.perf_counter()
    best, best_state, since, curve = val_recall(), copy.deepcopy(model.state_dict()), 0, []
    curve.append(best)
    for epoch in range(1, epochs + 1):
        model.train()
        order = torch.randperm(len(train), generator=generator)
        for s in range(0, len(order), batch_size):
            rows = order[s : s + batch_size]
            image_features, text_features, logit_scale = model(images[rows], tokens[rows])
            loss = loss_fn(image_features, text_features, logit_scale)
            optimiser.zero_grad(set_to_none=True)
            loss.backward()
            optimiser.step()
        score = val_recall()
        curve.append(score)
        print(
            f"  fine-tune epoch {epoch}: val recall@10 {score:.3f} ({time.perf_counter() - started:.0f} s)", flush=True
        )
        if score > best:
            best, best_state, since = score, copy.deepcopy(model.state_dict()), 0
        else:
            since += 1
            if since >= patience:
                break
    seconds = time.perf_counter() - started
    model.load_state_dict(best_state)
    img, txt = encode_split(model, preprocess, tokenizer, corpus, by_split["test"])
    return {**split_metrics(img, txt, by_split["test"]), "fit_seconds": seconds, "epochs": epoch, "val_curve": curve}


def main(argv=None) -> int:
    args = _parser().parse_args(argv)
    comparison = measure(args)
    checks = report(comparison, args.train)
    for name, ok in checks.items():
        print(f"  [{'x' if ok else ' '}] {name}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "adaptation.json").write_text(json.dumps(comparison, indent=2))
        (out / "adaptation.md").write_text(markdown_table(comparison))
        bar_chart(comparison, out / "adaptation.png", "target style: recall@10 on held-out pairs")
        if comparison.get("learning_curve"):
            ft = comparison["results"].get("fine-tune", {}).get("text_to_image", {}).get("recall@10")
            curve_chart(comparison["learning_curve"], out / "learning_curve.png", ft)
            (out / "learning_curve.md").write_text(curve_table(comparison["learning_curve"]))
        if comparison.get("source_style"):
            (out / "source_style.md").write_text(source_table(comparison))
        (out / "checks.json").write_text(json.dumps(checks, indent=2))
        print(f"wrote {out}/adaptation.json, .md, .png, learning_curve.png/.md, source_style.md")
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=5000)
    parser.add_argument("--val", type=int, default=500)
    parser.add_argument("--test", type=int, default=1000)
    parser.add_argument("--ft-epochs", type=int, default=10)
    parser.add_argument("--ft-lr", type=float, default=1e-4)
    parser.add_argument("--ft-batch-size", type=int, default=128)
    parser.add_argument("--ft-patience", type=int, default=4, help="fine-tuning epochs without a better val recall")
    parser.add_argument("--no-finetune", action="store_true", help="skip the full fine-tuning baseline")
    parser.add_argument("--finetune-json", default=None, help="take the fine-tuning row from an earlier run's JSON")
    parser.add_argument("--source", type=int, default=1000, help="source-style pairs held out (and as many replayed)")
    parser.add_argument(
        "--curve",
        type=lambda text: tuple(int(v) for v in text.split(",")),
        default=CURVE_SIZES,
        help="train sizes of the learning curve (default %(default)s)",
    )
    parser.add_argument(
        "--replay-weights",
        type=lambda text: tuple(float(v) for v in text.split(",")),
        default=(FitConfig().replay_weight,),
        help="distillation weights of the live+replay rows (default %(default)s)",
    )
    parser.add_argument(
        "--headline-only",
        action="store_true",
        help="only zero-shot, mlp, live and live+replay (no curve, other heads or fine-tuning)",
    )
    parser.add_argument("--out", default=None, help="folder for adaptation.json / .md / .png")
    return parser


def source_vectors(encoder, seed: int, n: int) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Base vectors of ``n`` source-style pairs (the style the encoder was trained on)."""
    scenes = world.scenes(n, seed)
    images = [world.render(sc, "source", 64, seed=seed * 100_000 + i).convert("RGB") for i, sc in enumerate(scenes)]
    captions = [world.caption(sc, "source") for sc in scenes]
    return encoder.encode_images(images), encoder.encode_texts(captions), captions


def source_recall(head: Head, source: tuple[np.ndarray, np.ndarray, list[str]]) -> float:
    """Text->image recall@10 of ``head`` on the held-out source-style pairs."""
    image, text, captions = source
    ids = [f"s{i}" for i in range(len(captions))]
    text_ids = [f"{i}#caption" for i in ids]
    metrics = pair_metrics(
        ids,
        head.project(IMAGE, image),
        text_ids,
        head.project(TEXT, text),
        list(zip(ids, text_ids, strict=True)),
        text_groups=dict(zip(text_ids, captions, strict=True)),
    )
    return metrics["text_to_image"]["recall@10"]


def measure(args: argparse.Namespace) -> dict:
    """Every variant, the learning curve, the source-style retention and (unless
    --no-finetune) full fine-tuning, on one generated corpus."""
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        corpus, data_dir = Path(tmp) / "corpus", Path(tmp) / "data"
        started = time.perf_counter()
        records = write_target_corpus(corpus, {"train": args.train, "val": args.val, "test": args.test})
        encoder = load_encoder(DEMO_MODEL, None)
        index_corpus(corpus, data_dir, encoder, head=FitConfig(kind="identity"), progress=False)
        source = source_vectors(encoder, SOURCE_SEEDS["test"], args.source)
        replay_image, replay_text, _ = source_vectors(encoder, SOURCE_SEEDS["replay"], args.source)
        print(
            f"target-style corpus: {args.train} train / {args.val} val / {args.test} test pairs, generated and "
            f"indexed in {time.perf_counter() - started:.0f} s (encoder {encoder.identity}); "
            f"{args.source} source-style pairs held out, {args.source} to replay",
            flush=True,
        )
        _, catalog, store = open_data_dir(data_dir)
        vectors = load_vectors(store)
        train = pairs_from_catalog(catalog, store, "train", label_field="label", vectors=vectors)
        val = pairs_from_catalog(catalog, store, "val", label_field="label", vectors=vectors)
        comparison: dict = {
            "split": "test",
            "pairs": len(catalog.pairs("test")),
            "encoder": catalog.get_meta("encoder"),
            "results": {},
            "source_style": {},
        }

        def fit(config: FitConfig, train_pairs, val_pairs, *, gated: bool, replay: bool = False) -> tuple:
            data = TrainingData(vectors, train_pairs, val_pairs, None, None, [], 0)
            begun = time.perf_counter()
            result = fit_training_data(
                data, config, gated=gated, replay={IMAGE: replay_image, TEXT: replay_text} if replay else None
            )
            return result, time.perf_counter() - begun

        fitted: dict = {}  # the full-size mlp and live fits, reused as the learning curve's last point

        def partial() -> None:  # a slow machine still leaves what it measured
            if args.out:
                Path(args.out).mkdir(parents=True, exist_ok=True)
                (Path(args.out) / "partial.json").write_text(json.dumps(comparison, indent=2))

        def variant(name: str, config: FitConfig, gated: bool, replay: bool) -> None:
            result, seconds = fit(config, train, val, gated=gated, replay=replay)
            if name in ("mlp", "live"):
                fitted[name] = (result, seconds)
            head = result.head
            row = {**held_out_metrics(catalog, vectors, head, "test"), "fit_seconds": seconds}
            row["epochs"] = result.report.epochs
            if head.kind in ("linear", "mlp", "shared"):
                row["blend"] = head.blend
            if result.verdict is not None:
                row["gate"] = result.verdict.to_dict()
            comparison["results"][name] = row
            comparison["source_style"][name] = source_recall(head, source)
            print(
                f"  {name}: t->i recall@10 {row['text_to_image']['recall@10']:.3f}, source style "
                f"{comparison['source_style'][name]:.3f}, {seconds:.1f} s"
                + (f"; gate: {result.report.gate}" if result.report.gate else ""),
                flush=True,
            )
            partial()

        for name, config, gated, replay in VARIANTS:
            if name == "live+replay":
                for weight in args.replay_weights:  # the distillation's weight: old style kept vs new learnt
                    named = name if weight == config.replay_weight else f"{name} x{weight:g}"
                    variant(named, dataclasses.replace(config, replay_weight=weight), gated, replay)
            else:
                variant(name, config, gated, replay)
        if args.headline_only:
            return comparison
        fitted[len(train), len(val)] = (fitted.pop("mlp"), fitted.pop("live"))
        comparison["learning_curve"] = []
        learning_curve(args, fit, train, val, catalog, vectors, fitted, comparison["learning_curve"], partial)
        for name, config, gated, replay in OTHER_VARIANTS:
            variant(name, config, gated, replay)
        if args.finetune_json:
            earlier = json.loads(Path(args.finetune_json).read_text())
            comparison["results"]["fine-tune"] = earlier["results"]["fine-tune"]
            print(f"full fine-tuning: taken from {args.finetune_json}")
        elif not args.no_finetune:
            by_split = {s: [r for r in records if r["split"] == s] for s in SPLIT_SEEDS}
            print("full fine-tuning of the tiny encoder (upper bound) ...", flush=True)
            comparison["results"]["fine-tune"] = finetune(
                corpus,
                by_split,
                epochs=args.ft_epochs,
                batch_size=args.ft_batch_size,
                lr=args.ft_lr,
                patience=args.ft_patience,
            )
    return comparison


def learning_curve(args, fit, train, val, catalog, vectors, fitted: dict, curve: list, partial) -> None:
    """Text->image recall@10 on the test split at each train size: zero-shot, the mlp as
    trained (early-stopped on a validation split of an eighth of the train size), and what
    the gate put live from the same pairs, appended to ``curve``. ``fitted``: fits already
    made, by (train, val) sizes."""
    zero = held_out_metrics(catalog, vectors, Head("identity", int(train.image.shape[1])), "test")
    for n in [size for size in args.curve if size <= len(train)]:
        rows = np.arange(n)
        val_rows = np.arange(min(len(val), max(2, n // 8)))
        tr, va = train.subset(rows), val.subset(val_rows)
        if (n, len(va)) in fitted:
            (mlp, mlp_seconds), (live, live_seconds) = fitted[n, len(va)]
        else:
            mlp, mlp_seconds = fit(FitConfig(kind="mlp"), tr, va, gated=False)
            live, live_seconds = fit(FitConfig(kind="mlp"), tr, va, gated=True)
        verdict = live.verdict
        entry = {
            "pairs": n,
            "val_pairs": len(va),
            "identity": zero["text_to_image"]["recall@10"],
            "mlp": held_out_metrics(catalog, vectors, mlp.head, "test")["text_to_image"]["recall@10"],
            "live": held_out_metrics(catalog, vectors, live.head, "test")["text_to_image"]["recall@10"],
            "live_blend": live.head.blend,
            "cross_validated": len(va) < FitConfig().cv_below,
            "p_value": verdict.p_value if verdict else None,
            "mlp_seconds": mlp_seconds,
            "live_seconds": live_seconds,
        }
        curve.append(entry)
        print(
            f"  {n} pairs ({len(va)} val): zero-shot {entry['identity']:.3f}, mlp {entry['mlp']:.3f}, live "
            f"{entry['live']:.3f} (blend {entry['live_blend']:g}, p={entry['p_value']:.4f})",
            flush=True,
        )
        partial()


def report(comparison: dict, train_pairs: int) -> dict[str, bool]:
    """Print the table and the headline figures; returns the goals and whether each is met."""
    results = comparison["results"]
    print()
    print(markdown_table(comparison))
    r10 = {k: v["text_to_image"]["recall@10"] for k, v in results.items()}
    zs, mlp, pca = r10["identity"], r10["mlp"], r10.get("pca", float("nan"))
    print(
        f"text->image recall@10: zero-shot {zs:.3f}, PCA {pca:.3f}, mlp {mlp:.3f} "
        f"({mlp / max(zs, 1e-9):.1f}x zero-shot, +{mlp - zs:.3f}); mlp fit on {train_pairs} pairs: "
        f"{results['mlp']['fit_seconds']:.1f} s"
    )
    checks = {
        "mlp >= 2x zero-shot": mlp >= 2 * zs,
        "mlp >= zero-shot + 0.20": mlp >= zs + 0.20,
        **({"mlp > PCA": mlp > pca} if "pca" in r10 else {}),
        "mlp fit <= 60 s": results["mlp"]["fit_seconds"] <= 60,
    }
    if "fine-tune" in results:
        ft = r10["fine-tune"]
        share = {}
        for name in ("mlp", "live"):
            gain = (r10[name] - zs) / (ft - zs) if ft > zs else float("nan")
            time_share = results[name]["fit_seconds"] / results["fine-tune"]["fit_seconds"]
            share[name] = {"gain": gain, "time": time_share}
            print(
                f"full fine-tuning: recall@10 {ft:.3f} in {results['fine-tune']['fit_seconds']:.0f} s "
                f"({results['fine-tune']['epochs']} epochs); {name} reaches {gain:.0%} of its gain at "
                f"{time_share:.1%} of its time (aim: 95% at 10%)"
            )
        best = max(share.values(), key=lambda v: v["gain"])
        checks[">= 95% of the fine-tuning gain at <= 10% of its time"] = best["gain"] >= 0.95 and best["time"] <= 0.10
        comparison["fine_tune_share"] = share
    curve = comparison.get("learning_curve", [])
    if curve:
        print(curve_table(curve))
        worst = min(c["live"] - c["identity"] for c in curve)
        checks["live never below zero-shot by more than 0.01 (learning curve)"] = worst >= -0.01
    source = comparison.get("source_style", {})
    if source:
        print(source_table(comparison))
        for name in [n for n in source if n == "live" or n.startswith("live+replay")]:
            if name in source:
                checks[f"source style within 0.02 of zero-shot ({name})"] = source[name] >= source["identity"] - 0.02
    return checks


def curve_table(curve: list[dict]) -> str:
    lines = [
        "| train pairs | val pairs | zero-shot | mlp (as trained) | live (gate) | live blend | gate p | "
        "cross-validated |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c in curve:
        p = "-" if c["p_value"] is None else f"{c['p_value']:.4f}"
        lines.append(
            f"| {c['pairs']} | {c['val_pairs']} | {c['identity']:.3f} | {c['mlp']:.3f} | {c['live']:.3f} | "
            f"{c['live_blend']:g} | {p} | {'yes' if c['cross_validated'] else 'no'} |"
        )
    return "\n".join(lines) + "\n"


def source_table(comparison: dict) -> str:
    source, results = comparison["source_style"], comparison["results"]
    lines = ["| head (fitted on the target style) | source-style t->i R@10 | change vs zero-shot | target t->i R@10 |"]
    lines.append("|---|---|---|---|")
    for name, value in source.items():
        target = results[name]["text_to_image"]["recall@10"]
        lines.append(f"| {name} | {value:.3f} | {value - source['identity']:+.3f} | {target:.3f} |")
    return "\n".join(lines) + "\n"


def curve_chart(curve: list[dict], path: Path, fine_tune: float | None) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pairs = [c["pairs"] for c in curve]
    fig, ax = plt.subplots(figsize=(7, 3.8), dpi=110)
    ax.plot(pairs, [c["identity"] for c in curve], "k--", label="zero-shot")
    ax.plot(pairs, [c["mlp"] for c in curve], "o-", label="mlp as trained")
    ax.plot(pairs, [c["live"] for c in curve], "s-", label="live (gate + blend)")
    if fine_tune is not None:
        ax.plot([pairs[-1]], [fine_tune], "r*", markersize=12, label="full fine-tuning")
    ax.set_xscale("log")
    ax.set_xticks(pairs, [str(p) for p in pairs])
    ax.set_xlabel("train pairs (target style)")
    ax.set_ylabel("text->image recall@10 (test)")
    ax.set_ylim(0, 1)
    ax.set_title("learning curve")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
