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
from dataclasses import dataclass
from pathlib import Path

from xmodal.client import RefitRun, SearchClient
from xmodal.indexer import world
from xmodal.indexer.catalog import Catalog
from xmodal.indexer.encoder import DEMO_MODEL, Encoder, load_encoder
from xmodal.indexer.pipeline import index_corpus
from xmodal.server.engine import SearchEngine
from xmodal.server.refit import RefitPolicy, Refitter
from xmodal.server.service import Server

SEED = 11


@dataclass(frozen=True)
class Workload:
    """What the simulated users send and what is measured, all derived from the seeded corpus."""

    feedback: list[tuple[str, str]]  # (user-phrasing query, the image the user confirms), train/val images only
    by_user: dict[str, set[str]]  # user-phrasing caption -> every image of that scene (the right answers)
    user_queries: list[tuple[str, set[str]]]  # held-out test images, user phrasing
    original: list[tuple[str, set[str]]]  # held-out test images, the corpus's own (target) captions


@dataclass(frozen=True)
class Outcome:
    """What one simulation measured: recall before/after the refit and the refit's record."""

    before: dict[str, float]
    after: dict[str, float]
    marked: int
    sent_s: float
    run: RefitRun

    @property
    def delta_user(self) -> float:
        return self.after["user_phrasing"] - self.before["user_phrasing"]

    @property
    def delta_orig(self) -> float:
        return self.after["original_test_pairs"] - self.before["original_test_pairs"]

    @property
    def targets_met(self) -> bool:
        return self.run.state == "promoted" and self.delta_user >= 0.15 and self.delta_orig >= -0.02


def recall_at_10(client: SearchClient, queries: list[tuple[str, set[str]]]) -> float:
    hits = 0
    for text, right in queries:
        hits += any(h.item_id in right for h in client.search(text=text, k=10).hits)
    return hits / len(queries)


def build_parser() -> argparse.ArgumentParser:
    """The command line; refit defaults come from RefitPolicy so the bench runs what the server would."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=3000, help="corpus size (default 3000)")
    parser.add_argument("--feedback", type=int, default=500, help="feedback pairs sent (default 500)")
    parser.add_argument("--mode", default="query", choices=["query", "full", "auto"])
    parser.add_argument("--feedback-weight", type=float, default=RefitPolicy.feedback_weight)
    parser.add_argument("--epochs", type=int, default=RefitPolicy.epochs)
    parser.add_argument(
        "--mark-irrelevant",
        type=int,
        default=0,
        metavar="N",
        help="users also mark the wrong images among their top N hits as irrelevant (default 0)",
    )
    parser.add_argument("--hard-negative-weight", type=float, default=RefitPolicy.hard_negative_weight)
    parser.add_argument("--out", default=None, help="folder for feedback.json")
    return parser


def index_target_corpus(tmp: Path, pairs: int) -> Encoder:
    """Write and index the seeded target-style corpus under ``tmp``; returns the encoder used."""
    started = time.perf_counter()
    corpus = world.write_corpus(tmp / "corpus", n=pairs, seed=SEED, style="target", image_size=64)
    encoder = load_encoder(DEMO_MODEL, None)
    index_corpus(corpus, tmp / "data", encoder, progress=False)
    print(f"corpus: {pairs} target-style pairs indexed with an mlp head in {time.perf_counter() - started:.0f} s")
    return encoder


def prepare_workload(data: Path, pairs: int, feedback: int) -> Workload:
    """Feedback comes from train/val images only, so the test split stays held out for measuring."""
    scenes = world.scenes(pairs, SEED)
    ids = [f"target-{SEED}-{i:06d}" for i in range(pairs)]
    catalog = Catalog(data / "catalog.sqlite")
    split = {image_id: s for s in ("train", "val", "test") for image_id, _ in catalog.pairs(s)}
    # Several generated images can share a description: any image of the scene is a right answer.
    by_user: dict[str, set[str]] = {}
    by_target: dict[str, set[str]] = {}
    for image_id, scene in zip(ids, scenes, strict=True):
        by_user.setdefault(world.caption(scene, "user"), set()).add(image_id)
        by_target.setdefault(world.caption(scene, "target"), set()).add(image_id)
    feedback_rows = [i for i, image_id in enumerate(ids) if split[image_id] != "test"][:feedback]
    test_rows = [i for i, image_id in enumerate(ids) if split[image_id] == "test"]
    user_queries = [(world.caption(scenes[i], "user"), by_user[world.caption(scenes[i], "user")]) for i in test_rows]
    original = [(world.caption(scenes[i], "target"), by_target[world.caption(scenes[i], "target")]) for i in test_rows]
    return Workload(
        feedback=[(world.caption(scenes[i], "user"), ids[i]) for i in feedback_rows],
        by_user=by_user,
        user_queries=user_queries,
        original=original,
    )


def start_server(data: Path, encoder: Encoder, args: argparse.Namespace) -> Server:
    """Serve the indexed corpus on a free local port, with a refitter configured from the flags."""
    engine = SearchEngine(data, encoder)
    engine.load_current()
    refitter = Refitter(
        engine,
        RefitPolicy(
            mode=args.mode,
            feedback_weight=args.feedback_weight,
            epochs=args.epochs,
            hard_negative_weight=args.hard_negative_weight,
        ),
    )
    return Server(engine, port=0, refitter=refitter).start()


def measure(client: SearchClient, workload: Workload) -> dict[str, float]:
    """recall@10 of the held-out queries in both phrasings, through the server."""
    return {
        "user_phrasing": recall_at_10(client, workload.user_queries),
        "original_test_pairs": recall_at_10(client, workload.original),
    }


def send_feedback(client: SearchClient, workload: Workload, mark_irrelevant: int) -> tuple[int, float]:
    """Each user confirms their image (and, with ``mark_irrelevant``, rejects the wrong top hits).

    Returns (images marked irrelevant, seconds spent sending).
    """
    started = time.perf_counter()
    marked = 0
    for query, image_id in workload.feedback:
        wrong = []
        if mark_irrelevant:
            wrong = [
                h.item_id
                for h in client.search(text=query, k=mark_irrelevant).hits
                if h.item_id not in workload.by_user[query]
            ]
            marked += len(wrong)
        client.submit_feedback(text=query, relevant=[image_id], irrelevant=wrong, source="sim")
    return marked, time.perf_counter() - started


def refit_and_measure(client: SearchClient, workload: Workload, mode: str) -> tuple[RefitRun, dict[str, float]]:
    """Run one refit through AdminService.Refit, wait for its verdict, then measure again."""
    run = client.wait_for_refit(client.refit(mode), timeout=1800)
    return run, measure(client, workload)


def simulate(args: argparse.Namespace) -> tuple[Workload, Outcome]:
    """Index, serve, measure, send the feedback, refit and measure again, all in a temporary folder."""
    with tempfile.TemporaryDirectory() as tmp:
        encoder = index_target_corpus(Path(tmp), args.pairs)
        workload = prepare_workload(Path(tmp) / "data", args.pairs, args.feedback)
        server = start_server(Path(tmp) / "data", encoder, args)
        try:
            with SearchClient(server.address) as client:
                client.wait_until_serving(30)
                before = measure(client, workload)
                marked, sent_s = send_feedback(client, workload, args.mark_irrelevant)
                run, after = refit_and_measure(client, workload, args.mode)
        finally:
            server.stop(grace=1)
    return workload, Outcome(before=before, after=after, marked=marked, sent_s=sent_s, run=run)


def print_report(args: argparse.Namespace, workload: Workload, outcome: Outcome) -> None:
    """The summary lines (docs quote them: keep their wording)."""
    run, before, after = outcome.run, outcome.before, outcome.after
    delta_user, delta_orig = outcome.delta_user, outcome.delta_orig
    if args.mark_irrelevant:
        print(
            f"users marked {outcome.marked} images irrelevant (the wrong ones among their top {args.mark_irrelevant})"
        )
    print(
        f"{len(workload.feedback)} feedback pairs sent in {outcome.sent_s:.1f} s; refit {run.run_id}: {run.state} "
        f"({run.mode} mode, {run.duration_s:.1f} s; {run.message})"
    )
    print(
        f"held-out user-phrasing queries ({len(workload.user_queries)}): recall@10 {before['user_phrasing']:.3f} -> "
        f"{after['user_phrasing']:.3f} ({delta_user:+.3f}; target >= +0.15: "
        f"{'met' if delta_user >= 0.15 else 'NOT met'})"
    )
    print(
        f"original test pairs ({len(workload.original)}): recall@10 {before['original_test_pairs']:.3f} -> "
        f"{after['original_test_pairs']:.3f} ({delta_orig:+.3f}; target >= -0.02: "
        f"{'met' if delta_orig >= -0.02 else 'NOT met'})"
    )
    print(f"gate figures: before {run.before}; after { ({k: v for k, v in run.after.items() if k != 'fit'}) }")
    print(f"fit: {run.after.get('fit')}")


def write_json(out: Path, args: argparse.Namespace, workload: Workload, outcome: Outcome) -> None:
    """Write ``out``/feedback.json (key order and content as the docs show them)."""
    run = outcome.run
    out.mkdir(parents=True, exist_ok=True)
    (out / "feedback.json").write_text(
        json.dumps(
            {
                "pairs": args.pairs,
                "feedback": len(workload.feedback),
                "marked_irrelevant": outcome.marked,
                "hard_negative_weight": args.hard_negative_weight,
                "mode": run.mode,
                "state": run.state,
                "refit_seconds": run.duration_s,
                "before": outcome.before,
                "after": outcome.after,
                "gate_before": run.before,
                "gate_after": run.after,
            },
            indent=2,
        )
    )


def main(argv=None) -> int:
    """Exit 0 when the refit was promoted and both recall targets were met, 1 otherwise."""
    args = build_parser().parse_args(argv)
    workload, outcome = simulate(args)
    print_report(args, workload, outcome)
    if args.out:
        write_json(Path(args.out), args, workload, outcome)
    return 0 if outcome.targets_met else 1


if __name__ == "__main__":
    sys.exit(main())
