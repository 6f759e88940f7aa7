"""`runner` itself: parse, run the command's handler, turn what it raises into an exit code and one line.

The one place where exceptions a user can cause become exit codes (1 or 2)
and a single `runner: error: ...` line on stderr; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Sequence

from pydantic import ValidationError

from runner import ops
from runner.cli import terminal
from runner.cli import commands
from runner.cli.commands import EXIT_FAILED, EXIT_OK, EXIT_USAGE, Unavailable, load
from runner.cli.parser import build_parser
from runner.errors import (
    ConfigError,
    CorruptSnapshotError,
    ManifestError,
    SnapshotNotFoundError,
    StateMismatchError,
    UnsafeDataError,
)
from runner.storage import StorageError, UnsupportedURLError

EXIT_INTERRUPTED = 130
__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "main"]

# Exceptions a user can cause, by exit code; anything else is a bug and keeps its traceback.
USAGE_ERRORS = (ConfigError, UnsupportedURLError, ValidationError)
FAILURES = (StorageError, SnapshotNotFoundError, ops.RefusedError, ManifestError, CorruptSnapshotError,
            StateMismatchError, UnsafeDataError)


# -- the entry point -------------------------------------------------------------


# Fields whose flag is not `--<field>` (a trailing `_s`, seconds, is dropped by rule).
_FLAG_OF = {"": "settings", "command": "COMMAND", "storage_options": "--storage-option"}


def _describe(exc: BaseException) -> str:
    if isinstance(exc, ValidationError):
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else ""
        flag = _FLAG_OF.get(field, f"--{field.removesuffix('_s').replace('_', '-')}")
        return f"invalid {flag}: {first['msg']}"
    return str(exc) or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; returns the exit code (see EXIT_CODES)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv[:1] == ["imds-sim"]:
            return commands.imds_sim(argv[1:])
        if argv[:1] == ["rendezvous"]:
            return int(load("runner.rendezvous", "main", "the rendezvous store")(argv[1:]))
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exit_:  # argparse: --help (0) or a usage error (2), already printed
            return exit_.code if isinstance(exit_.code, int) else EXIT_USAGE
        quiet = args.quiet or getattr(args, "json", False)
        with terminal.logging_to_stderr(logging.WARNING if quiet else logging.INFO):
            return args.handler(args)
    except USAGE_ERRORS as exc:
        terminal.error(_describe(exc))
        return EXIT_USAGE
    except (*FAILURES, Unavailable) as exc:
        terminal.error(_describe(exc))
        return EXIT_FAILED
    except KeyboardInterrupt:
        terminal.error("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
