"""`xmodal demo`: a site-style corpus, zero-shot vs adapted search, served over gRPC.

The shipped xmodal-demo model was pretrained on the generated world's *source* style. The
demo generates a corpus in the *target* ("site") style (greyscale, noisy pictures;
clinical-register captions), indexes it and fits the default mlp head on its train pairs,
serves the adapted snapshot, and shows held-out queries answered zero-shot beside adapted.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from xmodal.indexer import world
from xmodal.indexer.catalog import Catalog
from xmodal.indexer.encoder import DEMO_MODEL, Encoder, load_encoder
from xmodal.indexer.errors import FailedPrecondition
from xmodal.indexer.heads import Head
from xmodal.indexer.manifest import Manifest
from xmodal.indexer.pipeline import index_corpus
from xmodal.indexer.snapshot import DataDir, Snapshot, write_snapshot
from xmodal.indexer.store import BaseStore
from xmodal.server.config import ServeConfig
from xmodal.server.engine import SearchEngine
from xmodal.server.live import LiveView

STYLE = "target"
EXAMPLES = 3
HITS = 5


def _zero_shot_snapshot(data: DataDir, encoder_identity: str) -> str:
    """The id of an identity-head snapshot of the current data (written once, not made current)."""
    current_id = data.current_id()
    if current_id is None:
        raise FailedPrecondition("the demo index has no current snapshot")
    current = Snapshot(data.snapshots / current_id)
    for snapshot_id in reversed(data.snapshot_ids()):
        manifest = Manifest.read(data.snapshots / snapshot_id)
        if manifest.head_kind == "identity" and manifest.counts == current.manifest.counts:
            return snapshot_id
    catalog = Catalog(data.catalog_path)
    manifest = write_snapshot(
        data,
        catalog,
        BaseStore(data.base, catalog),
        Head("identity", current.head.dim_in),
        encoder=encoder_identity,
        make_current=False,
    )
    return manifest.id


def _captions(corpus: Path) -> dict[str, str]:
    with open(corpus / "captions.jsonl") as handle:
        return {r["id"]: r["caption"] for r in map(json.loads, handle)}


def run_demo(*, data: str = "demo-data", port: int = ServeConfig.port, once: bool = False, n: int = 2000) -> int:
    from xmodal.client import SearchClient
    from xmodal.server.service import Server, wait_for_stop_signal

    root = Path(data).resolve()
    corpus = world.write_corpus(root / "corpus", n=n, seed=0, style=STYLE, image_size=64)
    print(f"demo corpus: {n} generated image-caption pairs in the target ('site') style in {corpus}")
    encoder = load_encoder(DEMO_MODEL, None)
    report = index_corpus(corpus, root / "index", encoder)
    print(report.summary())
    datadir = DataDir(root / "index")
    adapted, zero_shot = _engines(datadir, encoder)
    try:
        server = Server(adapted, port=port).start()
    except FailedPrecondition as exc:
        print(f"xmodal demo: cannot listen on 127.0.0.1:{port} ({exc}); pass --port 0 for any free port")
        return 2
    print(f"\nserving the adapted snapshot {adapted.view.live().id} on {server.address}\n")
    captions = _captions(corpus)
    held_out = [image_id for image_id, _ in Catalog(datadir.catalog_path).pairs("test")][:EXAMPLES]
    with SearchClient(server.address) as client:
        client.wait_until_serving(timeout=30)
        _show_searches(client, adapted, zero_shot, captions, held_out)
    _print_recall(adapted.view.live().manifest.metrics)
    zero_shot.close()
    if once:
        server.stop(grace=1)
        return 0
    print(
        f"\nstill serving on {server.address}; try:\n"
        f"  xmodal search --server {server.address} --text '{captions[held_out[0]]}'\n"
        "press Ctrl-C to stop"
    )
    wait_for_stop_signal()
    server.stop(grace=2)
    return 0


def _engines(datadir: DataDir, encoder: Encoder) -> tuple[SearchEngine, SearchEngine]:
    """The served engine (the adapted snapshot) and an in-process zero-shot one to compare with."""
    adapted = SearchEngine(datadir.root, encoder)
    adapted.clean_debris()
    adapted.load_current()
    zero_shot = SearchEngine(datadir.root, encoder)
    quiet = logging.getLogger(LiveView.__module__)
    level, quiet.level = quiet.level, logging.WARNING  # its swap is not the served one: don't log it as such
    try:
        zero_shot.load_snapshot(_zero_shot_snapshot(datadir, encoder.identity))
    finally:
        quiet.setLevel(level)
    return adapted, zero_shot


def _show_searches(
    client, adapted: SearchEngine, zero_shot: SearchEngine, captions: dict[str, str], held_out: list[str]
) -> None:
    """Held-out text queries, zero-shot beside adapted; then one image query."""
    for image_id in held_out:
        query = captions[image_id]
        adapted_hits = client.search(text=query, k=HITS).hits
        zero_hits = zero_shot.search(text=query, k=HITS).hits
        print(f"held-out query: {query!r}")
        print(f"  {'zero-shot':<58}  adapted ({adapted.view.live().head.kind} head)")
        for zero, fit in zip(zero_hits, adapted_hits, strict=False):
            cells = []
            for hit in (zero, fit):
                mark = "=" if captions.get(hit.item_id) == query else " "
                cells.append(f"{hit.rank}. {hit.score:+.2f} {mark} {captions.get(hit.item_id, '')[:46]}")
            print(f"  {cells[0]:<58}  {cells[1]}")
    image_id = held_out[0]
    result = client.search(image=client.get_items([image_id])[0].image, k=3)
    print(f"image -> text with the picture of {image_id} (caption: {captions[image_id]!r}):")
    for hit in result.hits:
        print(f"  {hit.rank}. {hit.score:+.3f} {hit.text}")


def _print_recall(metrics: dict) -> None:
    print("\n'=' marks an image whose own caption is the query (identical captions count too).")
    if "adapted" in metrics:
        zs, ad = metrics["zero_shot"]["text_to_image"], metrics["adapted"]["text_to_image"]
        print(
            f"held-out text->image recall@10: zero-shot {zs['recall@10']:.3f} -> adapted {ad['recall@10']:.3f} "
            f"({ad['queries']} queries)"
        )
