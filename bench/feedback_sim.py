"""Feedback simulation: users query in the reserved third phrasing and confirm the right image.

A target-style corpus is indexed with the default mlp head and served (a real gRPC server
on 127.0.0.1). Simulated users take images of the train/val splits, describe them in the
"user" phrasing (never seen by the corpus head), and confirm the image through
SubmitFeedback. After the feedback, one refit runs through AdminService.Refit. Measured
through the server before and after, on images of the test split (never used as feedback):

- recall@10 of held-out queries in the user phrasing (target: +0.15 or more),
- recall@10 of the original test pairs' captions (target: falls by at most 0.02).

An image counts as a right answer when its scene is the one the query describes (several
generated images share a description). With ``--mark-irrelevant N`` the users also mark
the wrong images among their query's top N hits as irrelevant (hard negatives of the refit).

    python bench/feedback_sim.py [--pairs 3000] [--feedback 500] [--mode query] [--mark-irrelevant N]
                                 [--out docs/results/feedback]
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

from xmodal.client import SearchClient
from xmodal.indexer import world
from xmodal.indexer.catalog import Catalog
from xmodal.indexer.encoder import DEMO_MODEL, load_encoder
from xmodal.indexer.pipeline import index_corpus
from xmodal.server.engine import SearchEngine
from xmodal.server.refit import RefitPolicy, Refitter
from xmodal.server.service import Server

SEED = 11


def recall_at_10(client: SearchClient, queries: list[tuple[str, set[str]]]) -> float:
    hits = 0
    for text, right in queries:
        hits += any(h.item_id in right for h in client.search(text=text, k=10).hits)
    return hits / len(queries)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3000, help="corpus size (default 3000)")
    parser.add_argument("--feedback", type=int, default=500, help="feedback pairs sent (default 500)")
    parser.add_argument("--mode", default="query", choices=["query", "full", "auto"])
    parser.add_argument("--feedback-weight", type=float, default=RefitPolicy.feedback_weight)
    parser.add_argument("--epochs", type=int, default=RefitPolicy.epochs)
    parser.add_argument("--mark-irrelevant", type=int, default=0, metavar="N",
                        help="users also mark the wrong images among their top N hits as irrelevant (default 0)")
    parser.add_argument("--hard-negative-weight", type=float, default=RefitPolicy.hard_negative_weight)
    parser.add_argument("--out", default=None, help="folder for feedback.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        corpus = world.write_corpus(Path(tmp) / "corpus", n=args.pairs, seed=SEED, style="target", image_size=64)
        encoder = load_encoder(DEMO_MODEL, None)
        index_corpus(corpus, Path(tmp) / "data", encoder, progress=False)
        print(f"corpus: {args.pairs} target-style pairs indexed with an mlp head in {time.perf_counter() - started:.0f} s")
        scenes = world.scenes(args.pairs, SEED)
        ids = [f"target-{SEED}-{i:06d}" for i in range(args.pairs)]
        catalog = Catalog(Path(tmp) / "data" / "catalog.sqlite")
        split = {image_id: s for s in ("train", "val", "test") for image_id, _ in catalog.pairs(s)}
        by_user, by_target = {}, {}
        for image_id, scene in zip(ids, scenes):
            by_user.setdefault(world.caption(scene, "user"), set()).add(image_id)
            by_target.setdefault(world.caption(scene, "target"), set()).add(image_id)
        feedback_rows = [i for i, image_id in enumerate(ids) if split[image_id] != "test"][:args.feedback]
        test_rows = [i for i, image_id in enumerate(ids) if split[image_id] == "test"]
        user_queries = [(world.caption(scenes[i], "user"), by_user[world.caption(scenes[i], "user")]) for i in test_rows]
        original = [(world.caption(scenes[i], "target"), by_target[world.caption(scenes[i], "target")]) for i in test_rows]

        engine = SearchEngine(Path(tmp) / "data", encoder)
        engine.load_current()
        refitter = Refitter(engine, RefitPolicy(mode=args.mode, feedback_weight=args.feedback_weight,
                                                 epochs=args.epochs,
                                                 hard_negative_weight=args.hard_negative_weight))
        server = Server(engine, port=0, refitter=refitter).start()
        try:
            with SearchClient(server.address) as client:
                client.wait_until_serving(30)
                before = {"user_phrasing": recall_at_10(client, user_queries),
                          "original_test_pairs": recall_at_10(client, original)}
                t0 = time.perf_counter()
                marked = 0
                for i in feedback_rows:
                    query = world.caption(scenes[i], "user")
                    wrong = []
                    if args.mark_irrelevant:
                        wrong = [h.item_id for h in client.search(text=query, k=args.mark_irrelevant).hits
                                 if h.item_id not in by_user[query]]
                        marked += len(wrong)
                    client.submit_feedback(text=query, relevant=[ids[i]], irrelevant=wrong, source="sim")
                sent_s = time.perf_counter() - t0
                run = client.wait_for_refit(client.refit(args.mode), timeout=1800)
                after = {"user_phrasing": recall_at_10(client, user_queries),
                         "original_test_pairs": recall_at_10(client, original)}
        finally:
            server.stop(grace=1)
    delta_user = after["user_phrasing"] - before["user_phrasing"]
    delta_orig = after["original_test_pairs"] - before["original_test_pairs"]
    if args.mark_irrelevant:
        print(f"users marked {marked} images irrelevant (the wrong ones among their top {args.mark_irrelevant})")
    print(f"{len(feedback_rows)} feedback pairs sent in {sent_s:.1f} s; refit {run.run_id}: {run.state} "
          f"({run.mode} mode, {run.duration_s:.1f} s; {run.message})")
    print(f"held-out user-phrasing queries ({len(user_queries)}): recall@10 {before['user_phrasing']:.3f} -> "
          f"{after['user_phrasing']:.3f} ({delta_user:+.3f}; target >= +0.15: {'met' if delta_user >= 0.15 else 'NOT met'})")
    print(f"original test pairs ({len(original)}): recall@10 {before['original_test_pairs']:.3f} -> "
          f"{after['original_test_pairs']:.3f} ({delta_orig:+.3f}; target >= -0.02: "
          f"{'met' if delta_orig >= -0.02 else 'NOT met'})")
    print(f"gate figures: before {run.before}; after {({k: v for k, v in run.after.items() if k != 'fit'})}")
    print(f"fit: {run.after.get('fit')}")
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "feedback.json").write_text(json.dumps({
            "pairs": args.pairs, "feedback": len(feedback_rows), "marked_irrelevant": marked,
            "hard_negative_weight": args.hard_negative_weight, "mode": run.mode, "state": run.state,
            "refit_seconds": run.duration_s, "before": before, "after": after, "gate_before": run.before,
            "gate_after": run.after}, indent=2))
    return 0 if run.state == "promoted" and delta_user >= 0.15 and delta_orig >= -0.02 else 1


if __name__ == "__main__":
    sys.exit(main())
