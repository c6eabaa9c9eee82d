"""Commands that change a running server's corpus: upsert, delete."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Iterator, Sequence
from pathlib import Path

from xmodal.indexer.errors import InvalidArgument

from ._common import add_client_args, add_progress_arg, connect, default_server, field_default, usage_error
from .client_commands import ClientCommand, add_server_arg

BATCH_SIZE = 64  # items per UpsertItems call, and ids per DeleteItems call


def _add_batch_size_arg(parser: argparse.ArgumentParser, what: str) -> None:
    parser.add_argument("--batch-size", type=int, default=BATCH_SIZE, help=f"{what} per call (default %(default)s)")


def _check_batch_size(args: argparse.Namespace) -> None:
    if args.batch_size < 1:
        raise usage_error(args, f"--batch-size must be at least 1, got {args.batch_size}")


class UpsertCommand(ClientCommand):
    name = "upsert"
    help = "add or replace the items of a corpus on a running server (role index or admin)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_server_arg(parser, default_server())
        parser.add_argument(
            "corpus", metavar="CORPUS", help="a folder with captions.jsonl/.csv, or a JSONL manifest (as xmodal index)"
        )
        _add_batch_size_arg(parser, "items")
        add_progress_arg(parser)
        add_client_args(parser)

    def validate(self, args: argparse.Namespace) -> None:
        super().validate(args)
        _check_batch_size(args)

    def run(self, args: argparse.Namespace) -> int:
        from tqdm import tqdm

        from xmodal.indexer.corpus import read_corpus

        corpus = read_corpus(args.corpus)  # before connecting: a bad corpus sends nothing
        batches = list(_batches(corpus, args.batch_size, _max_batch_bytes()))
        totals = {"added": 0, "changed": 0, "unchanged": 0, "pairs_added": 0}
        with (
            connect(args, args.server) as client,
            tqdm(total=len(corpus.items), unit="item", disable=args.no_progress, file=sys.stderr) as bar,
        ):
            for n, batch in enumerate(batches):
                result = _send(client, batch, n, len(batches), sent=bar.n)
                for name in totals:
                    totals[name] += getattr(result, name)
                bar.update(len(batch))
        print(
            f"upserted {len(corpus.items)} items: {totals['added']} added, {totals['changed']} changed, "
            f"{totals['unchanged']} unchanged; {totals['pairs_added']} pairs added"
        )
        return 0


def _send(client, batch: list[tuple], n: int, batches: int, sent: int):
    """One UpsertItems call; its error says which batch failed and what was applied before it."""
    from xmodal.client import XmodalError

    try:
        return client.upsert_items([_new_item(item, pair_id) for item, pair_id in batch])
    except XmodalError as exc:
        applied = f"the {sent} items before it were applied" if sent else "nothing was applied"
        raise type(exc)(
            f"{exc} (batch {n + 1} of {batches}, applied whole or not at all: {applied}; "
            "running upsert again counts them as unchanged)",
            exc.code,
        ) from None


def _max_batch_bytes() -> int:
    """Image bytes per call: half the server's default message limit, so that a batch of large
    images is split before the server refuses it (--batch-size still caps the item count)."""
    from xmodal.server.config import ServeConfig

    return field_default(ServeConfig, "max_message_bytes") // 2


def _batches(corpus, batch_size: int, max_bytes: int) -> Iterator[list[tuple]]:
    """(item, pair id) lists to send in order: every image before any text, so that the image a
    text names as its pair exists on the server when the text arrives. Each image file is
    checked before anything is sent; its bytes are read only when its batch is sent."""
    from xmodal.indexer.corpus import IMAGE, TEXT

    pair_of = _text_pairs(corpus)
    images = [item for item in corpus.items if item.modality == IMAGE]
    _check_image_files(images)
    batch: list[tuple] = []
    size = 0
    for item in images + [item for item in corpus.items if item.modality == TEXT]:
        weight = os.path.getsize(item.path) if item.modality == IMAGE else len(item.text.encode())
        if batch and (len(batch) == batch_size or size + weight > max_bytes):
            yield batch
            batch, size = [], 0
        batch.append((item, pair_of.get(item.id, "")))
        size += weight
    if batch:
        yield batch


def _text_pairs(corpus) -> dict[str, str]:
    """{text id: its image's id}. A NewItem carries one pair, so a text paired with two
    images is refused before anything is sent."""
    pair_of: dict[str, str] = {}
    for pair in corpus.pairs:
        earlier = pair_of.setdefault(pair.text_id, pair.image_id)
        if earlier != pair.image_id:
            raise InvalidArgument(
                f"text item {pair.text_id!r} is paired with two images ({earlier!r}, {pair.image_id!r}); "
                "an upserted text carries one pair: give it one image, or build the corpus with xmodal index"
            )
    return pair_of


def _check_image_files(images: Sequence) -> None:
    missing = [item for item in images if not os.path.isfile(item.path) or not os.access(item.path, os.R_OK)]
    if missing:
        shown = ", ".join(f"{item.id} ({item.source})" for item in missing[:5])
        more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
        raise InvalidArgument(f"{len(missing)} image file(s) missing or unreadable: {shown}{more}; nothing was sent")


def _new_item(item, pair_id: str):
    """The client's NewItem for one corpus item; an image's bytes are read here."""
    from xmodal.client import NewItem
    from xmodal.indexer.corpus import TEXT

    content = {"text": item.text} if item.modality == TEXT else {"image": Path(item.path).read_bytes()}
    # item.source is relative to the corpus root: where the corpus lies here is not the server's business
    return NewItem(item.id, **content, metadata=item.metadata or None, pair_id=pair_id, source=item.source)


class DeleteCommand(ClientCommand):
    name = "delete"
    help = "delete items from a running server's corpus by id (role index or admin)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        add_server_arg(parser, default_server())
        parser.add_argument("ids", nargs="*", metavar="ID", help="ids of the items to delete")
        parser.add_argument("--file", metavar="IDS", help="a file of ids, one per line (blank lines skipped)")
        parser.add_argument(
            "--purge",
            action="store_true",
            help="also erase every copy of the items from the data directory before answering",
        )
        _add_batch_size_arg(parser, "ids")
        add_client_args(parser)

    def validate(self, args: argparse.Namespace) -> None:
        super().validate(args)
        _check_batch_size(args)
        if args.ids and args.file:
            raise usage_error(args, "give the ids as arguments or in --file IDS, not both")
        if not args.ids and not args.file:
            raise usage_error(args, "give the ids to delete: ID [ID ...], or --file IDS (one id per line)")

    def run(self, args: argparse.Namespace) -> int:
        ids = _read_ids(args.file) if args.file else list(args.ids)
        deleted: list[str] = []
        unknown: list[str] = []
        with connect(args, args.server) as client:
            for start in range(0, len(ids), args.batch_size):
                result = client.delete_items(ids[start : start + args.batch_size], purge=args.purge)
                deleted += result.deleted_ids
                unknown += result.unknown_ids
        print(_id_line("deleted", deleted))
        print(_id_line("unknown", unknown))
        return 0


def _read_ids(file: str) -> list[str]:
    try:
        lines = Path(file).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidArgument(f"cannot read the ids file {file!r} ({getattr(exc, 'strerror', None) or exc})") from None
    ids = [line.strip() for line in lines if line.strip()]
    if not ids:
        raise InvalidArgument(f"{file} holds no ids (one id per line)")
    return ids


def _id_line(what: str, ids: list[str]) -> str:
    return f"{what} {len(ids)}: {', '.join(ids)}" if ids else f"{what} 0"


COMMANDS = (UpsertCommand(), DeleteCommand())
