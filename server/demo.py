"""`xmodal demo`: generate an offline corpus, index it, serve it and show searches."""

from __future__ import annotations

import logging
import signal
import threading
from pathlib import Path

from xmodal.indexer import world
from xmodal.indexer.encoder import DEMO_MODEL, load_encoder
from xmodal.indexer.pipeline import index_corpus

log = logging.getLogger("xmodal.demo")
# Rows of the generated corpus whose captions serve as example text queries.
EXAMPLE_ROWS = (1, 2, 3)


def run_demo(*, data: str = "demo-data", port: int = 50051, once: bool = False, n: int = 1000) -> int:
    from xmodal.client import SearchClient
    from xmodal.server.engine import SearchEngine
    from xmodal.server.service import Server

    data_dir = Path(data).resolve()
    corpus = world.write_corpus(data_dir / "corpus", n=n, seed=0, style="source")
    print(f"demo corpus: {n} generated image-caption pairs in {corpus}")
    encoder = load_encoder(DEMO_MODEL, None)
    report = index_corpus(corpus, data_dir / "index", encoder)
    print(report.summary())

    engine = SearchEngine(data_dir / "index", encoder)
    engine.load_current()
    try:
        server = Server(engine, port=port).start()
    except (OSError, RuntimeError) as exc:
        print(f"xmodal demo: cannot listen on 127.0.0.1:{port} ({exc}); pass --port 0 for any free port")
        return 2
    print(f"\nserving on {server.address}\n")
    captions = dict(_captions(corpus))
    examples = [list(captions.values())[row % len(captions)] for row in EXAMPLE_ROWS]
    with SearchClient(server.address) as client:
        client.wait_until_serving(timeout=30)
        for query in examples:
            result = client.search(text=query, k=5)
            print(f"text -> image: {query!r}")
            for hit in result.hits:
                caption = captions.get(hit.item_id, "")
                mark = "=" if caption == query else " "
                print(f"  {hit.rank}. {hit.score:+.3f} {mark} {hit.item_id}: {caption}")
        first_image = next(iter(captions))
        image_bytes = client.get_items([first_image])[0].image
        result = client.search(image=image_bytes, k=3)
        print(f"image -> text: {first_image} (true caption: {captions[first_image]!r})")
        for hit in result.hits:
            print(f"  {hit.rank}. {hit.score:+.3f} {hit.item_id}: {hit.text}")
        result = client.search(item_id=f"{first_image}#caption", k=3)
        print(f"item -> image: {first_image}#caption")
        for hit in result.hits:
            print(f"  {hit.rank}. {hit.score:+.3f} {hit.item_id}: {captions.get(hit.item_id, '')}")
    print("\n('=' marks an image whose own caption is the query.)")
    if once:
        server.stop(grace=1)
        return 0
    print(f"\nstill serving on {server.address}; try:\n"
          f"  xmodal search --server {server.address} --text '{examples[0]}'\n"
          "press Ctrl-C to stop")
    stopping = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stopping.set())
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    stopping.wait()
    server.stop(grace=2)
    return 0


def _captions(corpus: Path):
    import json

    with open(corpus / "captions.jsonl") as handle:
        for line in handle:
            record = json.loads(line)
            yield record["id"], record["caption"]
