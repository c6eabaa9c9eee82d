"""`xmodal demo`: a thin wrapper of xmodal.server.demo.run_demo, with its defaults."""

from __future__ import annotations

import argparse

from ._common import Command, param_default


class DemoCommand(Command):
    name = "demo"
    help = "generate the offline demo corpus, index it, serve it, show queries"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from xmodal.server.demo import run_demo

        parser.add_argument(
            "--data", default=param_default(run_demo, "data"), help="data directory (default %(default)s)"
        )
        parser.add_argument(
            "--port",
            type=int,
            default=param_default(run_demo, "port"),
            help="port on 127.0.0.1 (default %(default)s; 0 = any free)",
        )
        parser.add_argument(
            "--n",
            type=int,
            default=param_default(run_demo, "n"),
            help="image-caption pairs to generate (default %(default)s)",
        )
        parser.add_argument("--once", action="store_true", help="exit after the example searches instead of serving on")

    def run(self, args: argparse.Namespace) -> int:
        from xmodal.server.demo import run_demo

        return run_demo(data=args.data, port=args.port, once=args.once, n=args.n)


COMMANDS = (DemoCommand(),)
