"""The ``purge-worker`` command line: parse, load the config, dispatch to ``worker.commands``.

Exit codes: 0 success; 2 bad usage, config or input (one line on stderr naming what is wrong);
1 a runtime failure.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
from typing import TYPE_CHECKING, NamedTuple, NoReturn

from worker import __version__
from worker.errors import ConfigError, PermanentError, PurgeWorkerError, RetryableError, UsageError
from worker.runtime import tune_gc_thresholds

if TYPE_CHECKING:
    from types import ModuleType

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class Command(NamedTuple):
    help: str
    needs_config: bool = True
    calls_api: bool = True


# Each command's module (``worker.commands.<name>``, dashes as underscores) is imported only when
# that command runs: `--help` and `explain` do not pay for Kafka's, the API client's and the
# Prometheus client's imports.
COMMANDS: dict[str, Command] = {
    "run": Command("consume, purge and dead-letter until SIGTERM/SIGINT"),
    "explain": Command("print the purge plan one event produces", calls_api=False),
    "check": Command("validate the config and rules (--online: Kafka, tokens)"),
    # Replay's republish mode never calls the API; replay checks its own mode.
    "replay": Command("re-drive records from a dead-letter topic", calls_api=False),
    "purge": Command("an ad-hoc purge through the worker's batching and limits"),
    "trace": Command(
        "which purges covered a URL, tag or event (the receipts topic)", calls_api=False
    ),
    "cache": Command("Cache Reserve, Tiered Cache and Variants settings"),
    "emulator": Command("a local Cloudflare API emulator", needs_config=False),
    "config-schema": Command("print the config file's JSON Schema", needs_config=False),
}


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, as every bad input gets: argparse's default prints the whole usage too.
        self.exit(EXIT_USAGE, f"{self.prog}: {message}\n")


class HelpFormatter(argparse.HelpFormatter):
    """Shows each option's default, when it has one worth showing."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            "%(default)" in text
            or "default" in text
            or default in (None, False, [], argparse.SUPPRESS)
            or not action.option_strings
        ):
            return text
        return f"{text} (default: %(default)s)"


def _module(name: str) -> ModuleType:
    return importlib.import_module(f"worker.commands.{name.replace('-', '_')}")


def build_parser(chosen: str | None = None) -> argparse.ArgumentParser:
    """The parser; only the ``chosen`` command's arguments are added (all, when None)."""
    parser = _Parser(
        prog="purge-worker",
        description="Kafka events in, Cloudflare purges out.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    for name, command in COMMANDS.items():
        p = sub.add_parser(
            name, help=command.help, description=command.help, formatter_class=HelpFormatter
        )
        if chosen is None or chosen == name:
            if command.needs_config:
                p.add_argument("-c", "--config", required=True, help="the YAML config file")
            _module(name).add_arguments(p)
    return parser


def _chosen(argv: list[str]) -> str | None:
    """The command ``argv`` names, if it names one before any option of its own."""
    for arg in argv:
        if not arg.startswith("-"):
            return arg if arg in COMMANDS else None
    return None


def _run(name: str, args: argparse.Namespace) -> int:
    """Load the config (the same validation for every command), then run the command.

    A command that calls the API fails before its first request when a token is missing, and
    ``check`` fails on it too, so ``check`` passes exactly when ``run`` can start."""
    command, module = COMMANDS[name], _module(name)
    if not command.needs_config:
        return int(module.run(args))
    # Imported here, not at the top: `--help` and the commands without a config never pay for
    # the config model and the log setup.
    from worker.config.load import load  # noqa: PLC0415
    from worker.observe import logs  # noqa: PLC0415

    config = load(args.config)
    logs.register_secrets(config.secrets())
    logs.configure(config.observability.log_format, config.observability.log_level)
    sends = command.calls_api and not getattr(args, "dry_run", False)
    if sends and not config.delivery.dry_run and config.missing_credentials():
        raise UsageError(config.missing_credentials()[0])
    return int(module.run(args, config))


def _redact(text: str) -> str:
    from worker.observe import logs  # noqa: PLC0415 (see _run)

    return logs.redact_text(text)


def main(argv: list[str] | None = None) -> int:
    tune_gc_thresholds()  # before the command's imports
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser(_chosen(argv) or "")
    if not argv:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    args = parser.parse_args(argv)
    try:
        return _run(args.command, args)
    except (ConfigError, UsageError) as exc:
        print(f"purge-worker {args.command}: {_redact(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except (PermanentError, RetryableError, PurgeWorkerError) as exc:
        print(f"purge-worker {args.command}: {_redact(str(exc))}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`config-schema | head -1`): nothing more to tell it, and
        # Python's own flush at exit must not fail on the closed pipe with a traceback.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return EXIT_FAILURE
