"""Issue 14, item 5: does anything short of full fine-tuning close the gap on the target style?

On the generated world's target style (the corpus of bench/adaptation.py: 5,000 train, 500
val, 1,000 test pairs) the mlp head reaches text->image recall@10 0.705 and full fine-tuning
of the tiny encoder 0.876. Probes, each printing test recall@10 (identical captions count
as interchangeable right answers, as ``held_out_metrics`` counts them) and wall time:

- ``--heads``: wider, larger-batch and unregularised mlp heads, through ``fit_training_data``
  exactly as ``xmodal fit`` trains them (is the head short of capacity?);
- ``--head2toe``: Head2Toe's idea, features from every block of the locked image tower (the
  class token and the mean of the patch tokens after each block, layer-normalised, beside
  the final embedding), cached once; a residual mlp (dropout 0.1) maps them into the shared
  space, the text side a residual mlp (do the earlier layers keep what the output lost?);
- ``--tokens``: a head on the locked image tower's last 64 patch tokens (a learned query
  attends over them; an mlp maps the pooled token and the final embedding to a residual
  update), the text side a residual mlp (is the information in the tokens the class token
  dropped?);
- ``--tower text|image --blocks N``: the last N transformer blocks of one tower (with its
  final norm and projection) trained on cached intermediate tokens, the other tower locked
  with a residual mlp on its cached embeddings, CLIP's loss, early stopping on validation
  (patience 8) within ``--max-seconds`` (LiT locks the image tower; the target style's
  shift is in both); the blocks train at ``--lr``, the other tower's mlp at the heads' 2e-3.
  Caching the tokens is timed apart;
- ``--diagnose``: where the default mlp fails and why: which facts of the scene (shape,
  shade, position, size, background) the top image of each missed text query gets wrong,
  and how well each fact can be read back from the locked image tower's features (an mlp
  probe trained on the train pictures, accuracy on the test pictures): from its final
  embedding, from every block's features (Head2Toe's), and from the picture's pixels
  themselves (a small CNN on the 64 x 64 grey values: what the picture holds for a model
  that is trained on it). Figures of 2026-12-01: docs/results/adaptation/partial_tuning.txt.

    python bench/partial_tuning.py --heads
    python bench/partial_tuning.py --diagnose
    python bench/partial_tuning.py --head2toe
    python bench/partial_tuning.py --tower text --blocks 2 --lr 5e-4
    python bench/partial_tuning.py --tokens
    python bench/partial_tuning.py --tower image --blocks 1 --lr 1e-3
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import open_clip
import torch
from torch.nn import functional as F

sys.path.insert(0, str(Path(__file__).parent))
import adaptation  # noqa: E402  (the same generated corpus)

from xmodal.indexer import world  # noqa: E402
from xmodal.indexer.adapt import TrainingData, fit_training_data, held_out_metrics, open_data_dir  # noqa: E402
from xmodal.indexer.corpus import IMAGE, TEXT  # noqa: E402
from xmodal.indexer.encoder import DEMO_MODEL, load_encoder, resolve_model  # noqa: E402
from xmodal.indexer.images import decode_image  # noqa: E402
from xmodal.indexer.pipeline import index_corpus  # noqa: E402
from xmodal.indexer.train import FitConfig, pairs_from_catalog  # noqa: E402
from xmodal.indexer.vectors import load_vectors  # noqa: E402

SIZES = {"train": 5000, "val": 500, "test": 1000}
HEADS = {
    "mlp (default)": FitConfig(kind="mlp"),
    "mlp, hidden 2048": FitConfig(kind="mlp", hidden=2048),
    "mlp, batch 1024, lr 4e-3": FitConfig(kind="mlp", batch_size=1024, lr=4e-3),
    "mlp, no weight decay or norm penalty": FitConfig(kind="mlp", norm_penalty=0.0, weight_decay=0.0),
}


def indexed(corpus: Path, data: Path) -> tuple:
    """The corpus indexed as ``xmodal index`` does (zero-shot head): its catalog, base
    vectors and the train/val pairs that ``xmodal fit`` trains on."""
    index_corpus(corpus, data, load_encoder(DEMO_MODEL, None), head=FitConfig(kind="identity"), progress=False)
    _, catalog, store = open_data_dir(data)
    vectors = load_vectors(store)
    train = pairs_from_catalog(catalog, store, "train", label_field="label", vectors=vectors)
    val = pairs_from_catalog(catalog, store, "val", label_field="label", vectors=vectors)
    return catalog, vectors, TrainingData(vectors, train, val, None, None, [], 0)


def heads(corpus: Path, data: Path) -> None:
    catalog, vectors, training = indexed(corpus, data)
    for name, config in HEADS.items():
        started = time.perf_counter()
        result = fit_training_data(training, config, gated=False)
        seconds = time.perf_counter() - started
        metrics = held_out_metrics(catalog, vectors, result.head, "test")
        print(
            f"{name}: test t->i recall@10 {metrics['text_to_image']['recall@10']:.3f}, "
            f"i->t {metrics['image_to_text']['recall@10']:.3f}, {seconds:.1f} s, {result.report.epochs} epochs",
            flush=True,
        )


def train(
    params: list,
    lr: float,
    pair: Callable,
    recall: Callable,
    *,
    max_seconds: float,
    patience: int,
    log: bool,
    head_params: list | None = None,
) -> tuple[int, float, float]:
    """CLIP's loss over the train pairs in batches of 256 (``pair(rows)``: their text and
    image vectors), early stopping on validation recall within ``max_seconds``; restores the
    best state. ``params`` train at ``lr``, ``head_params`` (a locked tower's mlp) at the
    heads' 2e-3; the last of the last list is the logit scale. Returns (epochs, seconds, best val)."""
    head_params = head_params or []
    scale = (head_params or params)[-1]
    groups = [{"params": params, "lr": lr}] + ([{"params": head_params, "lr": 2e-3}] if head_params else [])
    optimiser = torch.optim.AdamW(groups, weight_decay=0.01)
    params = params + head_params
    started = time.perf_counter()
    best, best_state, since, epoch = recall("val"), None, 0, 0
    while time.perf_counter() - started < max_seconds and since < patience:
        epoch += 1
        order = torch.randperm(SIZES["train"])
        for s in range(0, len(order), 256):
            texts, images = pair(order[s : s + 256])
            logits = scale.exp() * texts @ images.T
            target = torch.arange(len(texts))
            loss = (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        score = recall("val")
        if score > best:
            best, best_state, since = score, [p.detach().clone() for p in params], 0
        else:
            since += 1
        if log:
            print(
                f"  epoch {epoch}: val t->i recall@10 {score:.3f} ({time.perf_counter() - started:.0f} s)", flush=True
            )
    if best_state is not None:
        with torch.no_grad():
            for p, q in zip(params, best_state, strict=True):
                p.copy_(q)
    return epoch, time.perf_counter() - started, best


def recall_at_10(texts: torch.Tensor, images: torch.Tensor, captions: list[str]) -> float:
    """Text->image recall@10 as ``held_out_metrics`` counts it: any image whose caption is
    the query's own (identical captions are interchangeable right answers) in the top 10."""
    codes = {c: i for i, c in enumerate(dict.fromkeys(captions))}
    label = torch.tensor([codes[c] for c in captions])
    top = (texts @ images.T).topk(10, dim=1).indices
    return (label[top] == label[:, None]).any(1).float().mean().item()


class MultiLayer(torch.nn.Module):
    """Head2Toe's head: ``normalize(final + fc2(dropout(relu(fc1(all layers)))))``."""

    def __init__(self, features: int, dim: int, hidden: int = 512):
        super().__init__()
        self.dim = dim
        self.fc1, self.fc2 = torch.nn.Linear(features, hidden), torch.nn.Linear(hidden, dim)
        torch.nn.init.zeros_(self.fc2.weight)
        torch.nn.init.zeros_(self.fc2.bias)
        self.dropout = torch.nn.Dropout(0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x[:, : self.dim] + self.fc2(self.dropout(torch.relu(self.fc1(x)))), dim=-1)


@dataclass
class LockedFeatures:
    """What the locked towers give every pair, cached once: the image tower's final
    embedding, Head2Toe's features (that embedding, then the layer-normalised class token
    and mean patch token after each block), its last block's patch tokens, and the
    normalised text embeddings."""

    final: torch.Tensor
    blocks: torch.Tensor
    tokens: torch.Tensor
    texts: torch.Tensor


def locked_features(corpus: Path, records: list[dict]) -> LockedFeatures:
    name = resolve_model(DEMO_MODEL, None).model
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    model.eval()
    visual = model.visual
    finals, blocks, tokens = [], [], []
    with torch.inference_mode():
        pixels = torch.stack([preprocess(decode_image((corpus / r["image"]).read_bytes())) for r in records])
        for s in range(0, len(pixels), 500):
            x = pixels[s : s + 500]
            x = visual.conv1(x).reshape(x.shape[0], visual.conv1.out_channels, -1).permute(0, 2, 1)
            x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + visual.positional_embedding
            x = visual.ln_pre(x)
            layers = []
            for block in visual.transformer.resblocks:
                x = block(x)
                layers += [x[:, 0], x[:, 1:].mean(1)]
            final = F.normalize(visual.ln_post(x[:, 0]) @ visual.proj, dim=-1)
            finals.append(final)
            blocks.append(torch.cat([final] + [F.layer_norm(f, f.shape[-1:]) for f in layers], dim=1))
            tokens.append(x[:, 1:].clone())
        texts = F.normalize(model.encode_text(tokenizer([r["caption"] for r in records])).float(), dim=-1)
    return LockedFeatures(
        torch.cat(finals).float(), torch.cat(blocks).float(), torch.cat(tokens).float(), texts.clone()
    )


FACTS = ("shape", "colour", "position", "size", "background")  # colour: a shade of grey in the target style


def diagnose(corpus: Path, records: list[dict], data: Path) -> None:
    """Where the default mlp misses, and which facts the locked tower's features still hold."""
    _, vectors, training = indexed(corpus, data)
    head = fit_training_data(training, FitConfig(kind="mlp"), gated=False).head
    scene = {
        f"{split}-{i:05d}": s
        for split, n in SIZES.items()
        for i, s in enumerate(world.scenes(n, adaptation.SPLIT_SEEDS[split]))
    }
    ids = [r["id"] for r in records]
    rows = {m: {item: n for n, item in enumerate(vectors[m].ids)} for m in (IMAGE, TEXT)}
    base = torch.from_numpy(vectors[IMAGE].array[[rows[IMAGE][i] for i in ids]])
    test = [n for n, r in enumerate(records) if r["split"] == "test"]
    text = head.project(TEXT, vectors[TEXT].array[[rows[TEXT][f"{ids[n]}#caption"] for n in test]])
    image = head.project(IMAGE, base[test].numpy())
    captions = [records[n]["caption"] for n in test]
    top = torch.from_numpy(text @ image.T).topk(10, dim=1).indices
    print(f"mlp: test t->i recall@10 {recall_at_10(torch.from_numpy(text), torch.from_numpy(image), captions):.3f}")
    missed: dict[tuple[str, ...], int] = {}
    wrong = dict.fromkeys(FACTS, 0)
    for q, ranked in enumerate(top.tolist()):
        first = scene[ids[test[ranked[0]]]]
        facts = tuple(f for f in FACTS if getattr(first, f) != getattr(scene[ids[test[q]]], f))
        for f in facts:
            wrong[f] += 1
        if not any(captions[r] == captions[q] for r in ranked):
            missed[facts] = missed.get(facts, 0) + 1
    print(
        "share of test queries whose top image gets a fact wrong: "
        + ", ".join(f"{f} {wrong[f] / len(test):.3f}" for f in FACTS)
    )
    print(f"{sum(missed.values())} missed queries; the facts their top image gets wrong:")
    for facts, count in sorted(missed.items(), key=lambda kv: -kv[1])[:8]:
        print(f"  {' + '.join(facts) or '(none)'}: {count}")

    labels = {f: sorted({getattr(s, f) for s in scene.values()}) for f in FACTS}
    y = torch.tensor([[labels[f].index(getattr(scene[i], f)) for f in FACTS] for i in ids])
    features = {"final embedding (128)": base}
    started = time.perf_counter()
    every_block = locked_features(corpus, records).blocks
    features[f"every block, Head2Toe ({every_block.shape[1]})"] = every_block
    print(f"(block features in {time.perf_counter() - started:.1f} s)")
    pixels = torch.stack(
        [
            torch.from_numpy(
                np.asarray(decode_image((corpus / r["image"]).read_bytes()).convert("L"), dtype=np.float32)
            )
            for r in records
        ]
    )
    for name, x in [*features.items(), ("pixels (64 x 64, a small CNN)", pixels[:, None] / 255.0)]:
        started = time.perf_counter()
        accuracy = probe(x, y, [len(labels[f]) for f in FACTS], conv=x.dim() == 4)
        print(
            f"probe on {name}: test accuracy "
            + ", ".join(f"{f} {a:.3f}" for f, a in zip(FACTS, accuracy, strict=True))
            + f" ({time.perf_counter() - started:.0f} s)",
            flush=True,
        )


def probe(x: torch.Tensor, y: torch.Tensor, classes: list[int], *, conv: bool, epochs: int = 40) -> list[float]:
    """One probe with an output per fact, trained on the train pictures (AdamW, 40 epochs),
    kept at its best validation epoch; returns each fact's test accuracy."""
    train, val = slice(0, SIZES["train"]), slice(SIZES["train"], SIZES["train"] + SIZES["val"])
    test = slice(val.stop, val.stop + SIZES["test"])
    if conv:
        body: torch.nn.Module = torch.nn.Sequential(
            torch.nn.Conv2d(1, 16, 5, stride=2, padding=2), torch.nn.ReLU(),
            torch.nn.Conv2d(16, 32, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 64, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Flatten(), torch.nn.Linear(64 * 8 * 8, 256), torch.nn.ReLU(),
        )  # fmt: skip
    else:
        mean, std = x[train].mean(0), x[train].std(0) + 1e-6
        x = (x - mean) / std
        body = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 512), torch.nn.ReLU(), torch.nn.Dropout(0.2))
    outs = torch.nn.ModuleList(torch.nn.Linear(256 if conv else 512, c) for c in classes)
    params = [*body.parameters(), *outs.parameters()]
    optimiser = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.01)

    def accuracy(part: slice) -> list[float]:
        body.eval()
        with torch.no_grad():
            h = body(x[part])
            got = [(out(h).argmax(1) == y[part, k]).float().mean().item() for k, out in enumerate(outs)]
        body.train()
        return got

    best, kept = -1.0, [0.0] * len(classes)
    for _ in range(epochs):
        order = torch.randperm(SIZES["train"])
        for s in range(0, len(order), 128):
            rows = order[s : s + 128]
            h = body(x[rows])
            loss = torch.stack([F.cross_entropy(out(h), y[rows, k]) for k, out in enumerate(outs)]).sum()
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        score = sum(accuracy(val))
        if score > best:
            best, kept = score, accuracy(test)
    return kept


class TokenPool(torch.nn.Module):
    """A head on the locked image tower's last patch tokens: a learned query attends over
    them (4 heads) and an mlp maps ``[final embedding, pooled]`` to a residual update of the
    final embedding, zero at the start."""

    def __init__(self, width: int, dim: int, hidden: int = 512):
        super().__init__()
        self.dim = dim
        self.norm = torch.nn.LayerNorm(width)
        self.query = torch.nn.Parameter(torch.randn(1, 1, width) * 0.02)
        self.attend = torch.nn.MultiheadAttention(width, 4, batch_first=True)
        self.fc1, self.fc2 = torch.nn.Linear(dim + width, hidden), torch.nn.Linear(hidden, dim)
        torch.nn.init.zeros_(self.fc2.weight)
        torch.nn.init.zeros_(self.fc2.bias)

    def forward(self, final: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        keys = self.norm(tokens)
        pooled, _ = self.attend(self.query.expand(len(tokens), -1, -1), keys, keys, need_weights=False)
        update = self.fc2(torch.relu(self.fc1(torch.cat([final, pooled[:, 0]], dim=1))))
        return F.normalize(final + update, dim=-1)


def head2toe(corpus: Path, records: list[dict], max_seconds: float) -> None:
    started = time.perf_counter()
    cached = locked_features(corpus, records)
    print(f"{cached.blocks.shape[1]} image features cached in {time.perf_counter() - started:.1f} s", flush=True)
    image_head = MultiLayer(cached.blocks.shape[1], cached.texts.shape[1])
    locked_head("head2toe", image_head, (cached.blocks,), cached.texts, records, max_seconds, log=False)


def token_head(corpus: Path, records: list[dict], max_seconds: float) -> None:
    started = time.perf_counter()
    cached = locked_features(corpus, records)
    shape, seconds = cached.tokens.shape, time.perf_counter() - started
    print(f"{shape[1]} x {shape[2]} patch tokens a picture, cached in {seconds:.1f} s", flush=True)
    image_head = TokenPool(shape[2], cached.final.shape[1])
    locked_head("token head", image_head, (cached.final, cached.tokens), cached.texts, records, max_seconds, log=True)


def locked_head(
    name: str,
    image_head: torch.nn.Module,
    inputs: tuple[torch.Tensor, ...],
    texts: torch.Tensor,
    records: list[dict],
    max_seconds: float,
    *,
    log: bool,
) -> None:
    """Train ``image_head(*inputs)`` against a residual mlp on the text embeddings (CLIP's
    loss, lr 2e-3, patience 15) and print its test recall@10."""
    captions = [r["caption"] for r in records]
    spans = {"train": (0, SIZES["train"]), "val": (SIZES["train"], SIZES["train"] + SIZES["val"])}
    spans["test"] = (spans["val"][1], spans["val"][1] + SIZES["test"])
    text_head = Locked(texts.shape[1])
    scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = [*image_head.parameters(), *text_head.parameters(), scale]

    def recall(split: str) -> float:
        a, b = spans[split]
        image_head.eval()
        with torch.no_grad():
            score = recall_at_10(text_head(texts[a:b]), image_head(*(x[a:b] for x in inputs)), captions[a:b])
        image_head.train()
        return score

    epoch, seconds, best = train(
        params,
        2e-3,
        lambda rows: (text_head(texts[rows]), image_head(*(x[rows] for x in inputs))),
        recall,
        max_seconds=max_seconds,
        patience=15,
        log=log,
    )
    print(
        f"{name}: test t->i recall@10 {recall('test'):.3f} after {epoch} epochs, "
        f"{seconds:.1f} s (val {best:.3f} over 500)",
        flush=True,
    )


class Locked(torch.nn.Module):
    """The locked tower's side: a residual mlp on its cached, normalised embeddings."""

    def __init__(self, dim: int, hidden: int = 512):
        super().__init__()
        self.fc1, self.fc2 = torch.nn.Linear(dim, hidden), torch.nn.Linear(hidden, dim)
        torch.nn.init.zeros_(self.fc2.weight)
        torch.nn.init.zeros_(self.fc2.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x + self.fc2(torch.relu(self.fc1(x))), dim=-1)


def partial(corpus: Path, records: list[dict], tower: str, blocks: int, lr: float, max_seconds: float) -> None:
    name = resolve_model(DEMO_MODEL, None).model
    model, _, preprocess = open_clip.create_model_and_transforms(name)
    tokenizer = open_clip.get_tokenizer(name)
    model.eval()
    visual = model.visual
    split = {s: [r for r in records if r["split"] == s] for s in SIZES}
    text_blocks, image_blocks = model.transformer.resblocks, visual.transformer.resblocks

    def image_tokens(rows: list[dict]) -> torch.Tensor:  # through the locked blocks
        x = torch.stack([preprocess(decode_image((corpus / r["image"]).read_bytes())) for r in rows])
        x = visual.conv1(x).reshape(x.shape[0], visual.conv1.out_channels, -1).permute(0, 2, 1)
        x = torch.cat([visual.class_embedding.expand(x.shape[0], 1, -1), x], dim=1) + visual.positional_embedding
        x = visual.ln_pre(x)
        for block in image_blocks[:-blocks]:
            x = block(x)
        return x

    def text_tokens(rows: list[dict]) -> tuple[torch.Tensor, torch.Tensor]:
        tokens = tokenizer([r["caption"] for r in rows])
        x = model.token_embedding(tokens) + model.positional_embedding
        for block in text_blocks[:-blocks]:
            x = block(x, attn_mask=model.attn_mask)
        return x, tokens.argmax(dim=-1)  # the end-of-text positions

    started = time.perf_counter()
    with torch.inference_mode():
        if tower == "text":
            cached = {s: tuple(t.clone() for t in text_tokens(rows)) for s, rows in split.items()}
            pictures = [preprocess(decode_image((corpus / r["image"]).read_bytes())) for r in records]
            other_all = F.normalize(model.encode_image(torch.stack(pictures)).float(), dim=-1)
        else:
            cached = {s: (image_tokens(rows).clone(),) for s, rows in split.items()}
            other_all = F.normalize(model.encode_text(tokenizer([r["caption"] for r in records])).float(), dim=-1)
    offsets = {"train": 0, "val": SIZES["train"], "test": SIZES["train"] + SIZES["val"]}
    other = {s: other_all[offsets[s] : offsets[s] + len(split[s])].clone() for s in SIZES}
    print(f"cached the locked part in {time.perf_counter() - started:.1f} s", flush=True)

    tail = torch.nn.ModuleList(copy.deepcopy(b) for b in (text_blocks if tower == "text" else image_blocks)[-blocks:])
    norm = copy.deepcopy(model.ln_final if tower == "text" else visual.ln_post)
    projection = torch.nn.Parameter((model.text_projection if tower == "text" else visual.proj).detach().clone())
    locked = Locked(other_all.shape[1])
    scale = torch.nn.Parameter(torch.tensor(math.log(1 / 0.07)))
    params = [*tail.parameters(), *norm.parameters(), projection]

    def tuned(rows: tuple[torch.Tensor, ...]) -> torch.Tensor:
        x = rows[0]
        for block in tail:
            x = block(x, attn_mask=model.attn_mask) if tower == "text" else block(x)
        x = norm(x)
        x = x[torch.arange(x.shape[0]), rows[1]] if tower == "text" else x[:, 0]
        return F.normalize(x @ projection, dim=-1)

    def text_image(s: str, rows: slice | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mine = tuned(tuple(t[rows] for t in cached[s]))
        theirs = locked(other[s][rows])
        return (mine, theirs) if tower == "text" else (theirs, mine)

    def recall(s: str) -> float:
        with torch.no_grad():
            parts = [text_image(s, slice(i, i + 500)) for i in range(0, len(split[s]), 500)]
            texts, images = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            return recall_at_10(texts, images, [r["caption"] for r in split[s]])

    epoch, seconds, best = train(
        params,
        lr,
        lambda rows: text_image("train", rows),
        recall,
        max_seconds=max_seconds,
        patience=8,
        log=True,
        head_params=[*locked.parameters(), scale],
    )
    print(
        f"{tower} tower, last {blocks} block(s) tuned: test t->i recall@10 {recall('test'):.3f} "
        f"after {epoch} epochs, {seconds:.1f} s (val {best:.3f} over 500)",
        flush=True,
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", action="store_true", help="the head sweep")
    parser.add_argument("--head2toe", action="store_true", help="a head on every block's features")
    parser.add_argument("--tokens", action="store_true", help="a head on the image tower's last patch tokens")
    parser.add_argument(
        "--diagnose", action="store_true", help="the mlp's misses, and probes of what the features hold"
    )
    parser.add_argument("--tower", choices=("text", "image"), default="text")
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--lr", type=float, default=5e-4)
    parser.add_argument("--max-seconds", type=float, default=150.0)
    args = parser.parse_args()
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        corpus = Path(tmp) / "corpus"
        records = adaptation.write_target_corpus(corpus, SIZES)
        if args.heads:
            heads(corpus, Path(tmp) / "data")
        elif args.tokens:
            token_head(corpus, records, args.max_seconds)
        elif args.diagnose:
            diagnose(corpus, records, Path(tmp) / "data")
        elif args.head2toe:
            head2toe(corpus, records, args.max_seconds)
        else:
            partial(corpus, records, args.tower, args.blocks, args.lr, args.max_seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
