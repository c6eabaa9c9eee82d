"""Administration: backup (a consistent copy of a data directory) and keys (API keys)."""

from __future__ import annotations

import argparse
import sys

from ._common import Command


class BackupCommand(Command):
    name = "backup"
    help = "consistent copy of a data directory, safe while a server runs"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        parser.add_argument("--data", required=True, help="data directory")
        parser.add_argument("--out", required=True, help="new folder for the copy (restore: use it as --data)")

    def run(self, args: argparse.Namespace) -> int:
        from xmodal.indexer.backup import backup

        result = backup(args.data, args.out)
        print(
            f"backed up {args.data} to {args.out}: catalog, {result['shards']} base shards, "
            f"{result['snapshots']} snapshots (live: {result['current']})"
        )
        return 0


class KeysCommand(Command):
    name = "keys"
    help = "create an API key (its hash goes into the key file; the key is printed once)"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from xmodal.server.auth import ROLES

        parser.add_argument("action", choices=["add"])
        parser.add_argument("--file", required=True, help="key file (JSON, created if missing, mode 600)")
        parser.add_argument("--name", required=True, help="who the key is for")
        parser.add_argument("--role", required=True, choices=ROLES)

    def run(self, args: argparse.Namespace) -> int:
        from xmodal.server.auth import add_key

        key = add_key(args.file, args.name, args.role)
        print(key)
        print(f"(stored only as a sha256 hash in {args.file}; this is the one time the key is shown)", file=sys.stderr)
        return 0


COMMANDS = (BackupCommand(), KeysCommand())
