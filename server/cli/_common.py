"""What the command modules share: the Command base class, default look-ups, flags made from
dataclass fields, and the flag groups several commands take (client/TLS, model).

Every default comes from the dataclass, signature or constant that declares it (FitConfig,
RefitPolicy, ServeConfig, ...); help strings show it with %(default)s. Heavy modules are
imported inside the functions, so a command's parser costs only what that command needs.
"""

from __future__ import annotations

import argparse
import dataclasses
import inspect
import json
import os
import typing
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from xmodal.indexer.errors import InvalidArgument
from xmodal.server.config import MIB, ServeConfig


class Command:
    """One subcommand: ``name`` and ``help`` for the listing, its flags, the checks across flags
    that argparse cannot express, and what it does."""

    name: str = ""
    help: str = ""

    def subparser_init(self, subparsers) -> argparse.ArgumentParser:
        """The command's own parser, without flags (add_arguments adds them)."""
        return subparsers.add_parser(self.name, help=self.help)

    def add_arguments(self, parser: argparse.ArgumentParser) -> None:
        """Add this command's flags."""

    def validate(self, args: argparse.Namespace) -> None:
        """Reject bad flag combinations before any work (raise :func:`usage_error`)."""

    def run(self, args: argparse.Namespace) -> int:
        """Do the command; returns the exit status."""
        raise NotImplementedError


def usage_error(args: argparse.Namespace, message: str) -> InvalidArgument:
    """The error for a bad flag combination; ``main`` prints it as one line,
    ``xmodal COMMAND: error: message``, and exits 2 like every other usage error."""
    return InvalidArgument(message)


def field_default(cls: type, name: str) -> Any:
    """The declared default of dataclass ``cls``'s field ``name``."""
    for field in dataclasses.fields(cls):
        if field.name != name:
            continue
        if field.default is not dataclasses.MISSING:
            return field.default
        if field.default_factory is not dataclasses.MISSING:
            return field.default_factory()
        raise TypeError(f"{cls.__name__}.{name} has no default")
    raise TypeError(f"{cls.__name__} has no field {name!r}")


def field_type(cls: type, name: str) -> Callable:
    """The argparse type of dataclass ``cls``'s field ``name``: its annotation, less None."""
    hint = typing.get_type_hints(cls)[name]
    return next((t for t in typing.get_args(hint) if t is not type(None)), hint)


# (flag, field, help): a flag that sets one dataclass field; {size} in the help shows the
# default as a byte size ("20 MiB"), %(default)s as it is.
FieldFlag = tuple[str, str, str]


def flag_dest(flag: str) -> str:
    return flag.lstrip("-").replace("-", "_")


def add_field_flags(parser: argparse.ArgumentParser, cls: type, flags: Sequence[FieldFlag]) -> None:
    """One flag per entry of ``flags``, typed and defaulted by its field of ``cls``."""
    for flag, field, help in flags:
        default = field_default(cls, field)
        if "{size}" in help:
            help = help.replace("{size}", size(default))
        parser.add_argument(flag, type=field_type(cls, field), default=default, help=help)


def field_values(args: argparse.Namespace, flags: Sequence[FieldFlag]) -> dict[str, Any]:
    """{field: value} of ``flags`` as parsed, to build their dataclass with."""
    return {field: getattr(args, flag_dest(flag)) for flag, field, _ in flags}


def param_default(func: Callable, name: str) -> Any:
    """The declared default of parameter ``name`` of ``func``."""
    default = inspect.signature(func).parameters[name].default
    if default is inspect.Parameter.empty:
        raise TypeError(f"{func.__qualname__}() parameter {name!r} has no default")
    return default


def size(n: int) -> str:
    """A byte count for help text: "20 MiB" when it is whole MiB."""
    return f"{n // MIB} MiB" if n % MIB == 0 else f"{n:,} bytes"


def default_server() -> str:
    """host:port of a server started with serve's defaults."""
    return ServeConfig().address


def add_progress_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def add_client_args(parser: argparse.ArgumentParser) -> None:
    """--timeout, API key and TLS flags of the commands that talk to a running server."""
    from xmodal.client import SearchClient

    parser.add_argument(
        "--timeout",
        type=float,
        default=param_default(SearchClient, "timeout"),
        help="seconds per call (default %(default)s)",
    )
    parser.add_argument(
        "--api-key",
        default=os.environ.get("XMODAL_API_KEY"),
        help="API key (default: $XMODAL_API_KEY), sent as 'authorization: Bearer KEY'",
    )
    parser.add_argument("--tls", action="store_true", help="connect with TLS")
    parser.add_argument("--ca-cert", default=None, help="PEM of the authority that signed the server's certificate")
    parser.add_argument("--client-cert", default=None, help="client certificate PEM (mutual TLS)")
    parser.add_argument("--client-key", default=None, help="client key PEM (mutual TLS)")


def validate_client_args(args: argparse.Namespace) -> None:
    if bool(args.client_cert) != bool(args.client_key):
        raise usage_error(args, "--client-cert and --client-key go together")


def connect(args: argparse.Namespace, server: str):
    """A SearchClient for ``server`` with the command's timeout, key and TLS flags."""
    from xmodal.client import SearchClient

    return SearchClient(
        server,
        timeout=args.timeout,
        api_key=args.api_key,
        tls=args.tls,
        ca_cert=args.ca_cert,
        client_cert=args.client_cert,
        client_key=args.client_key,
    )


def add_model_args(parser: argparse.ArgumentParser, *, default_from_data: bool = False) -> None:
    from xmodal.indexer.encoder import DEFAULT_MODEL, DEFAULT_PRETRAINED

    from_data = " (default: the model the data directory was indexed with)" if default_from_data else ""
    parser.add_argument(
        "--model",
        default=None,
        help=f"open_clip model name (default {DEFAULT_MODEL}), local-dir:/path, or xmodal-demo" + from_data,
    )
    parser.add_argument(
        "--pretrained",
        default=None,
        help=f"pretrained tag (default {DEFAULT_PRETRAINED} for {DEFAULT_MODEL}), a checkpoint "
        "path, or 'none' for random weights" + from_data,
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="intra-op threads of the encoder (torch or ONNX Runtime; default: one per core this process may use)",
    )
    parser.add_argument(
        "--allow-pickle",
        action="store_true",
        help="load a .pt/.bin checkpoint with full unpickling (trusted files only)",
    )


def add_device_arg(parser: argparse.ArgumentParser) -> None:
    """--device of the commands that run the encoder."""
    from xmodal.indexer.encoder import DEVICES

    parser.add_argument(
        "--device",
        default="cpu",
        metavar=DEVICES,
        help="where the encoder runs: auto picks a CUDA GPU when torch sees one (else MPS, else the CPU); "
        "cuda runs under fp16 autocast (default %(default)s)",
    )


def model_args(args: argparse.Namespace, data_dir: Path | None = None) -> tuple[str, str | None]:
    """(model, pretrained): the flags, else what ``data_dir`` was indexed with, else the defaults."""
    from xmodal.indexer.encoder import DEFAULT_MODEL, DEFAULT_PRETRAINED

    if args.model is None and args.pretrained is None and data_dir is not None:
        catalog_path = Path(data_dir) / "catalog.sqlite"
        if catalog_path.exists():
            from xmodal.indexer.catalog import Catalog

            recorded = Catalog(catalog_path).get_meta("model")
            if recorded:
                model, pretrained = json.loads(recorded)
                return model, pretrained
    model = args.model or DEFAULT_MODEL
    if args.pretrained is not None:
        return model, args.pretrained
    return model, (DEFAULT_PRETRAINED if model == DEFAULT_MODEL else None)
