"""Offline commands on a data directory: index, fit, eval."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import Command, add_device_arg, add_model_args, add_progress_arg, model_args, param_default, usage_error
from ._training import add_head_args, fit_config


class IndexCommand(Command):
    name = "index"
    help = "build or extend a data directory from a corpus"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from xmodal.indexer.pipeline import DEFAULT_BATCH_SIZE, DEFAULT_SHARD_SIZE
        from xmodal.indexer.snapshot import DEFAULT_FACTORY

        parser.add_argument("corpus", help="a folder with captions.jsonl/.csv, or a JSONL manifest")
        parser.add_argument("--data", required=True, help="data directory (created if missing)")
        add_model_args(parser, default_from_data=True)
        add_device_arg(parser)
        add_head_args(parser)
        parser.add_argument(
            "--batch-size",
            type=int,
            default=DEFAULT_BATCH_SIZE,
            help="encoder batch size (default %(default)s; on a GPU 256 or more uses it better: ViT-B-32 at 256 "
            "images needs about 1 GB in fp16)",
        )
        parser.add_argument(
            "--shard-size",
            type=int,
            default=DEFAULT_SHARD_SIZE,
            help="items per base shard and commit (default %(default)s)",
        )
        parser.add_argument("--workers", type=int, default=None, help="image decoding threads (default: cores, max 4)")
        _add_index_args(parser, DEFAULT_FACTORY, "default %(default)s")
        parser.add_argument(
            "--filter-fields",
            default=None,
            metavar="A,B",
            help="metadata fields searches may filter on (kept in the catalog; default: every field holding "
            "text or numbers)",
        )
        clinical = parser.add_argument_group(
            "DICOM files", "kept in the catalog: later runs, upserts and image queries read DICOM the same way"
        )
        clinical.add_argument(
            "--dicom-window",
            default=None,
            metavar="NAME|C,W",
            help="window replacing each file's own VOI: lung, mediastinum, bone, brain, soft-tissue, liver, "
            "or centre,width such as -600,1500 (default: the file's VOI LUT or window, else its min..max)",
        )
        clinical.add_argument(
            "--dicom-fields",
            default=None,
            metavar="A,B",
            help="DICOM attributes (keywords) kept as item metadata, replacing the default allowlist; "
            "identifying attributes and UIDs are refused (default: see README, Clinical images)",
        )
        clinical.add_argument(
            "--allow-burned-in",
            action=argparse.BooleanOptionalAction,
            default=None,
            help="index images flagged BurnedInAnnotation = YES (skipped by default: names may be in the pixels)",
        )
        ray = parser.add_argument_group(
            "Ray", "read, decode and encode on a Ray cluster; this process keeps the catalog and the base store"
        )
        ray.add_argument(
            "--ray",
            nargs="?",
            const="auto",
            default=None,
            metavar="ADDRESS",
            help="encode on Ray (pip install 'xmodal[ray]'): no value (or auto) is ray.init()'s choice: RAY_ADDRESS, "
            "else the cluster last started on this machine, else a local Ray for this run; or the address of a "
            "cluster's head, host:6379 (run xmodal index on a node of it)",
        )
        ray.add_argument(
            "--ray-workers",
            type=int,
            default=None,
            metavar="N",
            help="encoder actors (default: one per GPU of the cluster, else one per core as each node's memory allows)",
        )
        add_progress_arg(parser)

    def validate(self, args: argparse.Namespace) -> None:
        from xmodal.indexer import dicom
        from xmodal.indexer.encoder import resolve_device

        resolve_device(args.device)  # a GPU that is not here fails before any work

        args.dicom_window = dicom.parse_window(args.dicom_window) if args.dicom_window is not None else None
        args.dicom_fields = dicom.parse_fields(args.dicom_fields) if args.dicom_fields is not None else None
        if args.filter_fields is not None and not [f for f in args.filter_fields.split(",") if f.strip()]:
            raise usage_error(args, "--filter-fields is empty: name at least one metadata field, e.g. modality,year")
        args.ray_options = None
        if args.ray is not None:
            from xmodal.indexer.ray_pipeline import RayOptions, import_ray

            args.ray_options = RayOptions(address=args.ray, workers=args.ray_workers, allow_pickle=args.allow_pickle)
            import_ray()  # not installed: one line naming the extra, before any work
        elif args.ray_workers is not None:
            raise usage_error(args, "--ray-workers needs --ray")

    def run(self, args: argparse.Namespace) -> int:
        from xmodal.indexer.catalog import Catalog
        from xmodal.indexer.encoder import load_encoder
        from xmodal.indexer.pipeline import index_corpus
        from xmodal.indexer.snapshot import DataDir
        from xmodal.server.filters import declare_fields

        if args.filter_fields is not None:
            data = DataDir(args.data)
            data.create()
            declare_fields(Catalog(data.catalog_path), args.filter_fields.split(","))
        model, pretrained = model_args(args, Path(args.data))
        encoder = load_encoder(
            model, pretrained, threads=args.threads, allow_pickle=args.allow_pickle, device=args.device
        )
        report = index_corpus(
            args.corpus,
            args.data,
            encoder,
            head=fit_config(args),
            label_field=args.label_field,
            batch_size=args.batch_size,
            shard_size=args.shard_size,
            workers=args.workers,
            factory=args.factory,
            memory_budget=args.memory_budget,
            progress=not args.no_progress,
            dicom_window=args.dicom_window,
            dicom_fields=args.dicom_fields,
            allow_burned_in=args.allow_burned_in,
            ray=args.ray_options,
        )
        print(report.summary())
        return 0


class FitCommand(Command):
    name = "fit"
    help = "refit the head of a data directory offline and write a new snapshot"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--data", required=True, help="data directory")
        add_head_args(parser)
        parser.add_argument("--warm-start", action="store_true", help="start from the live snapshot's head (same kind)")
        parser.add_argument(
            "--no-feedback",
            action="store_true",
            help="train on the corpus pairs only (default: the feedback events' training slice too)",
        )
        parser.add_argument(
            "--replay-where",
            action="append",
            default=[],
            metavar="CONDITION",
            help="keep the items whose metadata matches (FIELD=A,B or FIELD>=LOW or FIELD<=HIGH, as search's "
            "--where; repeat to AND) where the live head puts them: a mixed archive keeps its old style while the "
            "head learns the new one (weight --replay-weight)",
        )
        _add_index_args(parser, None, "default: what the live snapshot asked for, else auto")
        add_progress_arg(parser)

    def validate(self, args: argparse.Namespace) -> None:
        super().validate(args)
        args.replay_select = None
        if args.replay_where:
            from xmodal.client import XmodalError
            from xmodal.client._client import filter_message
            from xmodal.indexer.errors import InvalidArgument
            from xmodal.server.filters import Columns
            from xmodal.server.service import conditions_from_proto

            from .client_commands import parse_where

            try:  # read as search reads --where: flags -> where -> Filter -> checked conditions
                conditions = conditions_from_proto(filter_message(parse_where(args.replay_where, "--replay-where")))
                for condition in conditions:
                    condition.check()
            except (ValueError, InvalidArgument, XmodalError) as exc:
                raise usage_error(args, str(exc)) from None
            args.replay_select = lambda catalog, ids: Columns.from_catalog(catalog, ids).mask(conditions)

    def run(self, args: argparse.Namespace) -> int:
        from xmodal.indexer.adapt import fit_snapshot
        from xmodal.indexer.ann import describe

        manifest, report = fit_snapshot(
            args.data,
            fit_config(args),
            label_field=args.label_field,
            warm_start=args.warm_start,
            factory=args.factory,
            memory_budget=args.memory_budget,
            progress=not args.no_progress,
            feedback=not args.no_feedback,
            replay_select=args.replay_select,
        )
        print(report.summary())
        metrics = manifest.metrics
        if metrics.get("replay"):
            replay = metrics["replay"]
            counts = ", ".join(f"{n} {modality}s" for modality, n in sorted(replay["items"].items()))
            teacher, weight = replay["teacher"], replay["weight"]
            print(f"  replayed {counts}, kept where the {teacher} head puts them (weight {weight:g})")
        if metrics.get("feedback_pairs"):
            print(
                f"  trained on {metrics['feedback_pairs']} feedback pairs as well as the corpus pairs "
                "(--no-feedback: corpus pairs only)"
            )
        print(f"wrote snapshot {manifest.id} ({manifest.head_kind} head) and made it current")
        for modality, choice in sorted(manifest.index.items()):
            print(f"  {modality} index: {describe(choice)}")
        for name in ("zero_shot", "adapted"):
            for direction, m in sorted(metrics.get(name, {}).items(), reverse=True):
                print(
                    f"  {name:9s} {direction.replace('_to_', '->')}: R@1 {m['recall@1']:.3f}  "
                    f"R@5 {m['recall@5']:.3f}  R@10 {m['recall@10']:.3f}  MRR {m['mrr']:.3f} "
                    f"({m['queries']} held-out queries)"
                )
        return 0


class EvalCommand(Command):
    name = "eval"
    help = "recall@k and MRR of zero-shot, PCA and each head kind on held-out pairs"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from xmodal.indexer.adapt import EVAL_KINDS, compare_heads
        from xmodal.indexer.corpus import SPLITS

        parser.add_argument("--data", required=True, help="data directory")
        parser.add_argument(
            "--split",
            default=param_default(compare_heads, "split"),
            choices=SPLITS,
            help="split to report on (default %(default)s)",
        )
        parser.add_argument(
            "--kinds", default=",".join(EVAL_KINDS), help="comma-separated head kinds (default %(default)s)"
        )
        parser.add_argument("--out", default=None, help="folder for eval.json, eval.md and eval.png")
        add_progress_arg(parser)
        add_head_args(parser)

    def validate(self, args: argparse.Namespace) -> None:
        from xmodal.indexer.heads import HEAD_KINDS

        kinds = _kinds(args)
        if not kinds:
            raise usage_error(args, "--kinds names no head kind")
        unknown = [k for k in kinds if k not in HEAD_KINDS]
        if unknown:
            raise usage_error(
                args, f"--kinds: unknown head kind(s) {', '.join(unknown)}; choose from {', '.join(HEAD_KINDS)}"
            )

    def run(self, args: argparse.Namespace) -> int:
        from xmodal.indexer.adapt import bar_chart, compare_heads, markdown_table

        comparison = compare_heads(
            args.data,
            kinds=_kinds(args),
            split=args.split,
            base=fit_config(args),
            label_field=args.label_field,
            progress=not args.no_progress,
        )
        table = markdown_table(comparison)
        print(table)
        if args.out:
            out = Path(args.out)
            out.mkdir(parents=True, exist_ok=True)
            (out / "eval.json").write_text(json.dumps(comparison, indent=2))
            (out / "eval.md").write_text(table)
            bar_chart(comparison, out / "eval.png")
            print(f"wrote {out / 'eval.json'}, {out / 'eval.md'} and {out / 'eval.png'}")
        return 0


def _memory_budget(text: str) -> int:
    from xmodal.indexer.ann import parse_bytes
    from xmodal.indexer.errors import InvalidArgument

    try:
        value = parse_bytes(text)
    except InvalidArgument as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    assert value is not None
    return value


def _add_index_args(parser: argparse.ArgumentParser, default: str | None, default_help: str) -> None:
    parser.add_argument(
        "--factory",
        default=default,
        help=(
            "index kind: auto (Flat while exact search is fast enough, else HNSW, IVF-SQ8 or OPQ-IVF-PQ "
            "with a refine step, search parameters tuned to recall@10 >= 0.98) or any FAISS factory string "
            f"({default_help})"
        ),
    )
    parser.add_argument(
        "--memory-budget",
        type=_memory_budget,
        default=None,
        metavar="BYTES",
        help="most memory an index may take, for --factory auto: bytes or 512M, 4G (default: no limit)",
    )


def _kinds(args: argparse.Namespace) -> list[str]:
    return [k.strip() for k in args.kinds.split(",") if k.strip()]


COMMANDS = (IndexCommand(), FitCommand(), EvalCommand())
