"""Commands that talk to a running server: feedback, search, status."""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

from xmodal.indexer.errors import InvalidArgument

from ._common import Command, add_client_args, connect, default_server, param_default, usage_error, validate_client_args

FEEDBACK_FIELDS = {"text", "image", "item_id", "relevant", "irrelevant", "weight", "source"}


class ClientCommand(Command):
    """A command with the client flags (--timeout, --api-key, TLS)."""

    def validate(self, args: argparse.Namespace) -> None:
        validate_client_args(args)


def add_server_arg(parser: argparse.ArgumentParser, default: str | None) -> None:
    """--server; with ``default`` None the command falls back to default_server() itself."""
    parser.add_argument("--server", default=default, help=f"host:port of a running server (default {default_server()})")


def _add_query_args(group, helps: tuple[str, str, str]) -> None:
    """--text, --image and --item into a mutually exclusive ``group``."""
    for flag, help in zip(("--text", "--image", "--item"), helps, strict=True):
        group.add_argument(flag, help=help)


class FeedbackCommand(ClientCommand):
    name = "feedback"
    help = "send feedback: a query and the items that answer it (one, or a JSONL file)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from xmodal.client import SearchClient

        add_server_arg(parser, default_server())
        query = parser.add_mutually_exclusive_group()
        _add_query_args(query, ("the query text", "path of the query image", "id of the query item"))
        query.add_argument(
            "--file", help="JSONL: {text|image|item_id, relevant: [...], irrelevant?, weight?, source?} per line"
        )
        parser.add_argument("--relevant", nargs="+", help="ids of the items that answer the query")
        parser.add_argument("--irrelevant", nargs="+", help="ids of items judged wrong")
        parser.add_argument(
            "--weight",
            type=float,
            default=param_default(SearchClient.submit_feedback, "weight"),
            help="weight of the event (default %(default)s; with --file: of lines without one)",
        )
        parser.add_argument("--source", default="cli", help="tag of where the feedback came from (default %(default)s)")
        add_client_args(parser)

    def validate(self, args: argparse.Namespace) -> None:
        super().validate(args)
        if args.file and (args.relevant or args.irrelevant):
            raise usage_error(
                args, "--relevant/--irrelevant go with --text/--image/--item; with --file each line carries its own"
            )
        if not args.file and not args.relevant:
            raise usage_error(args, "give --relevant ID (with --text/--image/--item), or --file FILE.jsonl")

    def run(self, args: argparse.Namespace) -> int:
        with connect(args, args.server) as client:
            for event in _events(args):
                feedback_id = client.submit_feedback(
                    text=event.get("text"),
                    image=event.get("image"),
                    item_id=event.get("item_id"),
                    relevant=event.get("relevant") or [],
                    irrelevant=event.get("irrelevant") or [],
                    weight=event.get("weight", args.weight),
                    source=event.get("source") or "",
                )
                print(feedback_id)
        return 0


def _events(args: argparse.Namespace) -> list[dict]:
    """The feedback events: the lines of --file (every line checked before any is sent),
    or the one of the flags."""
    if args.file:
        lines = Path(args.file).read_text().splitlines()
        return [_event_line(args.file, n, line) for n, line in enumerate(lines, start=1) if line.strip()]
    return [
        {
            "text": args.text,
            "image": args.image,
            "item_id": args.item,
            "relevant": args.relevant,
            "irrelevant": args.irrelevant or [],
            "weight": args.weight,
            "source": args.source,
        }
    ]


def _event_line(file: str, n: int, line: str) -> dict:
    """One line of a feedback file, checked: a JSON object of known fields with a list of ids."""
    where = f"{Path(file).name}: line {n}"
    try:
        event = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidArgument(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(event, dict):
        raise InvalidArgument(f'{where}: each line must be a JSON object like {{"text": "...", "relevant": ["ID"]}}')
    unknown = set(event) - FEEDBACK_FIELDS
    if unknown:
        raise InvalidArgument(f"{where}: unknown field(s) {sorted(unknown)}; known: {sorted(FEEDBACK_FIELDS)}")
    for name in ("relevant", "irrelevant"):
        ids = event.get(name) or []
        if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
            raise InvalidArgument(f"{where}: {name} must be a list of item ids (strings)")
    weight = event.get("weight", 1.0)
    if isinstance(weight, bool) or not isinstance(weight, (int, float)):
        raise InvalidArgument(f"{where}: weight must be a number, got {weight!r}")
    return event


class SearchCommand(ClientCommand):
    name = "search"
    help = "query a running server and print hits"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from xmodal.client import SearchClient

        add_server_arg(parser, default_server())
        query = parser.add_mutually_exclusive_group(required=True)
        _add_query_args(
            query, ("text query", "path of an image file to query with", "id of an indexed item to query with")
        )
        parser.add_argument(
            "--target", choices=["image", "text"], default=None, help="modality of the hits (default: the other one)"
        )
        parser.add_argument(
            "-k", type=int, default=param_default(SearchClient.search, "k"), help="number of hits (default %(default)s)"
        )
        parser.add_argument(
            "--where",
            action="append",
            default=[],
            metavar="COND",
            help="only hits whose metadata match: FIELD=A,B (one of), FIELD>=LOW, FIELD<=HIGH (numbers, or "
            "strings such as ISO dates); repeat to AND them (see `xmodal status` for the fields)",
        )
        parser.add_argument("--json", action="store_true", help="print JSON")
        add_client_args(parser)

    def validate(self, args: argparse.Namespace) -> None:
        super().validate(args)
        try:
            args.where_dict = parse_where(args.where)
        except ValueError as exc:
            raise usage_error(args, str(exc)) from None

    def run(self, args: argparse.Namespace) -> int:
        with connect(args, args.server) as client:
            result = client.search(
                text=args.text, image=args.image, item_id=args.item, target=args.target, k=args.k, where=args.where_dict
            )
        _print_hits(result, args.json)
        return 0


_WHERE = re.compile(r"^\s*([^<>=]+?)\s*(>=|<=|=)\s*(.*?)\s*$")


def parse_where(conditions: list[str], flag: str = "--where") -> dict[str, object]:
    """``--where`` flags (or ``flag``'s) as SearchClient.search's ``where``: FIELD=A,B (one
    of), FIELD>=LOW and FIELD<=HIGH (a range; both on one field make one range).

    Raises:
        ValueError: a condition it cannot read, saying which.
    """
    where: dict[str, object] = {}
    for text in conditions:
        match = _WHERE.match(text)
        if not match or not match.group(3):
            raise ValueError(f"{flag} {text!r}: write FIELD=A,B or FIELD>=LOW or FIELD<=HIGH")
        name, op, value = match.groups()
        if op == "=":
            if name in where:
                raise ValueError(f"{flag} {text!r}: {name} has a condition already")
            where[name] = [v.strip() for v in value.split(",") if v.strip()]
            continue
        bound = _number_or_text(value)
        current = where.get(name, (None, None))
        if not isinstance(current, tuple):
            raise ValueError(f"{flag} {text!r}: {name} has a condition already")
        low: float | str | None = current[0]
        high: float | str | None = current[1]
        low, high = (bound, high) if op == ">=" else (low, bound)
        if low is not None and high is not None and isinstance(low, str) != isinstance(high, str):
            raise ValueError(f"{flag} {text!r}: the ends of a range on {name} are both numbers or both text")
        where[name] = (low, high)
    return where


def _number_or_text(value: str) -> float | str:
    try:
        return float(value)
    except ValueError:
        return value


def _print_hits(result, as_json: bool) -> None:
    if as_json:
        print(
            json.dumps(
                {"snapshot_id": result.snapshot_id, "timing": result.timing, "hits": [vars(h) for h in result.hits]},
                indent=2,
            )
        )
        return
    for hit in result.hits:
        what = hit.text if hit.modality == "text" else hit.source
        print(f"{hit.rank:3d}  {hit.score:+.4f}  {hit.modality:5s}  {hit.item_id}  {what[:100]}")
    print(
        f"({len(result.hits)} hits from snapshot {result.snapshot_id}, {result.timing['total_ms']:.1f} ms "
        "on the server)"
    )


class StatusCommand(ClientCommand):
    name = "status"
    help = "print a running server's status"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_server_arg(parser, default_server())
        add_client_args(parser)

    def run(self, args: argparse.Namespace) -> int:
        with connect(args, args.server) as client:
            status = client.status()
        print(json.dumps({k: v for k, v in vars(status).items() if k != "raw"}, indent=2))
        return 0


COMMANDS = (FeedbackCommand(), SearchCommand(), StatusCommand())
