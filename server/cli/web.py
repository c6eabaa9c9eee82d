"""`xmodal web`: the case-lookup page, a web client of a running server."""

from __future__ import annotations

import argparse
import ipaddress
import logging
import signal
import socket

from xmodal.indexer.errors import InvalidArgument

from ._common import add_client_args, connect, default_server, usage_error
from .client_commands import ClientCommand, add_server_arg

log = logging.getLogger(__name__)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host``:``port`` (0: any free port), so the URL logged is the real one.

    Raises:
        InvalidArgument: the address cannot be bound (in use, not this machine's), saying which.
    """
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
    except OSError as exc:
        raise InvalidArgument(
            f"cannot listen on {host}:{port} ({exc.strerror or exc}): pick another --port, or --port 0 for a free one"
        ) from None
    return sock


def _loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


class WebCommand(ClientCommand):
    name = "web"
    help = "serve the case-lookup web page (search, image regions, feedback) for a running server"

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        from xmodal.server.web import DEFAULT_HOST, DEFAULT_PORT

        add_server_arg(parser, default_server())
        parser.add_argument("--host", default=DEFAULT_HOST, help="address the page listens on (default %(default)s)")
        parser.add_argument(
            "--port", type=int, default=DEFAULT_PORT, help="port of the page (default %(default)s; 0: any free port)"
        )
        add_client_args(parser)

    def validate(self, args: argparse.Namespace) -> None:
        super().validate(args)
        if not 0 <= args.port <= 65535:
            raise usage_error(args, f"--port must be 0..65535, got {args.port}")

    def run(self, args: argparse.Namespace) -> int:
        import uvicorn

        from xmodal.server.web import create_app

        sock = listen(args.host, args.port)
        host, port = sock.getsockname()[:2]
        shown = f"[{host}]" if ":" in host else host
        if not _loopback(host):
            log.warning(
                "the page listens on %s and has no login of its own: whoever reaches it searches (and sends "
                "feedback) with this command's API key",
                host,
            )
        with connect(args, args.server) as client:
            app = create_app(client)
            log.info("case-lookup page at http://%s:%d/ (search server %s)", shown, port, args.server)
            # uvicorn's own lines (startup, access log) stay off: the one line above says where
            server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
            # uvicorn stops gracefully on SIGTERM, then raises it again for the handler it found:
            # this no-op one makes a stop by SIGTERM exit 0, as `xmodal serve` does
            signal.signal(signal.SIGTERM, lambda signum, frame: None)
            server.run(sockets=[sock])
        return 0


COMMANDS = (WebCommand(),)
