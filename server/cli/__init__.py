"""The `xmodal` command line: one small module per command group, one class per command.

Each module lists its commands in ``COMMANDS`` (instances of _common.Command: ``name``,
``help``, ``add_arguments``, ``validate``, ``run``); ``main`` loops over the modules to
build the parser, so no single function knows every flag. A command's flags read their
defaults from the modules that declare them, which can be heavy (torch, faiss, open_clip),
so ``main`` adds flags only to the command being run; ``make_parser()`` adds every one.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from . import admin, client_commands, corpus_commands, demo, indexing, serving, snapshot_commands, web
from ._common import Command
from .serving import build_engine

__all__ = ["main", "make_parser", "build_engine", "COMMANDS"]

# in the order `xmodal --help` lists their commands
MODULES = (demo, indexing, serving, admin, client_commands, corpus_commands, snapshot_commands, web)
COMMANDS: tuple[Command, ...] = tuple(command for module in MODULES for command in module.COMMANDS)
DESCRIPTION = (
    "Cross-modal image/text search on frozen open_clip embeddings, with small CPU-trained heads, FAISS and gRPC."
)


def make_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The parser of every command; with ``only``, just the command of that name gets its flags
    (the others are listed, flagless), so parsing imports what that one command needs."""
    parser = argparse.ArgumentParser(prog="xmodal", description=DESCRIPTION)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for command in COMMANDS:
        subparser = command.subparser_init(subparsers)
        if only is None or command.name == only:
            command.add_arguments(subparser)
        subparser.set_defaults(handler=command)
    return parser


def _command_in(argv: Sequence[str]) -> str:
    """The command word of ``argv``: its first argument that is not an option ("" if none)."""
    return next((arg for arg in argv if not arg.startswith("-")), "")


def _setup_logging(verbose: bool) -> None:
    # open_clip logs every step of model loading at INFO on the root logger: keep ours only.
    logging.basicConfig(
        level=logging.DEBUG if verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    logging.getLogger("xmodal").setLevel(logging.DEBUG if verbose else logging.INFO)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = make_parser(only=_command_in(argv)).parse_args(argv)
    _setup_logging(args.verbose)
    from xmodal.client import XmodalError as ClientError
    from xmodal.indexer.errors import XmodalError

    command: Command = args.handler
    try:
        command.validate(args)
        return command.run(args)
    except (XmodalError, ClientError, FileNotFoundError) as exc:
        print(f"xmodal {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
