"""The ``copa`` command line. Every subcommand takes ``--config``, ``--set a.b=c`` and ``--out``.

Subcommands live with the code they drive; each module contributes ``register(subparsers)`` that
adds its parser and sets ``func`` to a function ``(args, cfg) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from copa.config import load_config
from copa.errors import UserError
from copa.utils.logging import setup_logging

log = logging.getLogger("copa")

# Modules that register subcommands, in the order they are listed in --help.
COMMAND_MODULES = [
    "copa.commands.info",
    "copa.commands.convert",
    "copa.commands.adapt",
    "copa.data.cli",
    "copa.train.cli",
    "copa.tasks.cli",
    "copa.commands.predict",
    "copa.commands.serve",
    "copa.commands.export",
    "copa.bench",
    "copa.demo",
]


def add_common(p: argparse.ArgumentParser, out_default: str | None = None) -> None:
    p.add_argument("--config", default=None, help="YAML config file (configs/*.yaml)")
    p.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="A.B=C",
        help="override a config value, e.g. --set train.steps=50 (repeatable)",
    )
    p.add_argument("--out", default=out_default, help="output directory")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="copa",
        description="COPA: efficient vision-language pre-training with text-aware patch selection.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name == name:  # not built yet: the command simply does not exist
                continue
            raise
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run one ``copa`` command; ``argv`` without the program name (default: ``sys.argv[1:]``).

    Returns the exit status (0 ok, 2 the user's to fix, other codes per command) and never calls
    ``sys.exit`` itself, so the library (``copa demo``) runs its stages through it; only argparse
    exits (status 2) on arguments it cannot parse. ``args.argv`` holds the argument list as given.
    """
    parser = build_parser()
    argv = list(sys.argv[1:] if argv is None else argv)
    args = parser.parse_args(argv)
    args.argv = argv
    setup_logging(logging.DEBUG if args.verbose else logging.INFO)
    if not getattr(args, "func", None):
        parser.print_help()
        return 0
    try:
        cfg = load_config(getattr(args, "config", None), getattr(args, "overrides", []))
        return int(args.func(args, cfg) or 0)
    except (
        UserError,
        FileNotFoundError,
        FileExistsError,
        NotADirectoryError,
        IsADirectoryError,
        PermissionError,
    ) as e:
        # the user's to fix: one line that says what, not a traceback (-v adds it)
        log.error("%s", _one_line(e), exc_info=args.verbose)
        return 2


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split()) or type(e).__name__
    return text if isinstance(e, UserError) else f"{type(e).__name__}: {text}"


if __name__ == "__main__":
    sys.exit(main())
