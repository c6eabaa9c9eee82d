"""Commands on a data directory's snapshots, through a running server or offline on the
directory itself: refit, snapshots, compact."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ._common import add_client_args, add_model_args, connect, default_server, model_args, usage_error
from ._training import add_refit_args, policy
from .client_commands import ClientCommand, add_server_arg

REFIT_WAIT_S = 1800.0  # how long `refit --wait` waits for the run by default


class RefitCommand(ClientCommand):
    name = "refit"
    help = "ask a running server to refit now, or refit a data directory offline"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from xmodal.server.refit import MODES

        add_server_arg(parser, None)
        parser.add_argument("--data", default=None, help="refit this data directory offline instead")
        parser.add_argument("--mode", default="", choices=["", *MODES], help="refit mode (default: the policy's)")
        parser.add_argument("--wait", action="store_true", help="wait for the run to finish and print it")
        add_client_args(parser)
        parser.add_argument(
            "--timeout-refit", type=float, default=REFIT_WAIT_S, help="seconds --wait waits (default %(default)s)"
        )
        add_model_args(parser, default_from_data=True)
        add_refit_args(parser)

    def validate(self, args: argparse.Namespace) -> None:
        super().validate(args)
        if args.server and args.data:
            raise usage_error(args, "pass --server (a running server) or --data (offline), not both")
        if args.data:
            policy(args)  # InvalidArgument on a bad refit flag, before the encoder loads

    def run(self, args: argparse.Namespace) -> int:
        if args.data:
            return _refit_offline(args)
        with connect(args, args.server or default_server()) as client:
            run_id = client.refit(args.mode)
            print(f"started {run_id}")
            if args.wait:
                run = client.wait_for_refit(run_id, timeout=args.timeout_refit)
                print(json.dumps(vars(run), indent=2))
        return 0


def _refit_offline(args: argparse.Namespace) -> int:
    from xmodal.indexer.errors import FailedPrecondition
    from xmodal.server.refit import Refitter

    from .serving import build_engine

    model, pretrained = model_args(args, Path(args.data))
    engine = build_engine(args.data, model, pretrained, args.threads, None, args.allow_pickle)
    refitter = Refitter(engine, policy(args))
    run_id = refitter.start(args.mode or None)
    refitter.wait()
    row = refitter.runs.get(run_id)
    if row is None:
        raise FailedPrecondition(f"refit {run_id} left no record in {args.data}")
    print(json.dumps({k: row[k] for k in ("id", "mode", "state", "snapshot_id", "message")}, indent=2))
    print(f"before: {row['before']}\nafter:  {row['after']}")
    return 0 if row["state"] in ("promoted", "rejected") else 1


class SnapshotsCommand(ClientCommand):
    name = "snapshots"
    help = "list snapshots, or roll back to one (--rollback ID)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_server_arg(parser, None)
        parser.add_argument("--data", default=None, help="work on a data directory instead of a server")
        parser.add_argument("--rollback", default=None, metavar="ID", help="make this snapshot live")
        add_client_args(parser)

    def validate(self, args: argparse.Namespace) -> None:
        super().validate(args)
        if args.server and args.data:
            raise usage_error(args, "pass --server (a running server) or --data (a data directory), not both")

    def run(self, args: argparse.Namespace) -> int:
        if args.data:
            return _snapshots_offline(args)
        with connect(args, args.server or default_server()) as client:
            if args.rollback:
                info = client.rollback(args.rollback)
                print(f"live snapshot is now {info.snapshot_id} ({info.head_kind})")
                return 0
            for info in client.list_snapshots():
                mark = "*" if info.live else " "
                print(f"{mark} {info.snapshot_id}  {info.head_kind:8s} parent {info.parent_id or '-'}")
        return 0


def _snapshots_offline(args: argparse.Namespace) -> int:
    from xmodal.indexer.manifest import Manifest
    from xmodal.indexer.snapshot import DataDir

    data = DataDir(args.data)
    if args.rollback:
        data.set_current(args.rollback)
        print(f"CURRENT is now {args.rollback}; a running server picks it up within its watch interval")
        return 0
    current = data.current_id()
    for snapshot_id in data.snapshot_ids():
        manifest = Manifest.read(data.snapshots / snapshot_id)
        mark = "*" if snapshot_id == current else " "
        print(f"{mark} {snapshot_id}  {manifest.head_kind:8s} parent {manifest.parent_id or '-'}")
    return 0


class CompactCommand(ClientCommand):
    name = "compact"
    help = "fold upserts and deletions into a new snapshot and erase deleted items, now"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_server_arg(parser, None)
        parser.add_argument("--data", default=None, help="compact this data directory offline (no server on it)")
        add_client_args(parser)
        add_model_args(parser, default_from_data=True)

    def validate(self, args: argparse.Namespace) -> None:
        super().validate(args)
        if args.server and args.data:
            raise usage_error(args, "pass --server (a running server) or --data (offline), not both")

    def run(self, args: argparse.Namespace) -> int:
        if args.data:
            report = _compact_offline(args)
        else:
            with connect(args, args.server or default_server()) as client:
                report = client.compact()
        print(
            f"live snapshot is now {report.snapshot_id} ({report.seconds:.1f} s): {report.folded_items} "
            f"upserted item(s) folded in, {report.erased_items} deleted item(s) erased, "
            f"{report.rewritten_snapshots} older snapshot(s) rewritten without them"
        )
        return 0


def _compact_offline(args: argparse.Namespace):
    from .serving import build_engine, serving_lock

    with serving_lock(args.data, "compact it through the server: xmodal compact --server HOST:PORT"):
        model, pretrained = model_args(args, Path(args.data))
        engine = build_engine(args.data, model, pretrained, args.threads, None, args.allow_pickle)
        try:
            return engine.compactor.compact("xmodal compact")
        finally:
            engine.close()


COMMANDS = (RefitCommand(), SnapshotsCommand(), CompactCommand())
