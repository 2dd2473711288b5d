"""The ``purge-worker`` command line: parse, load the config, dispatch to ``worker.commands``.

Exit codes: 0 success; 2 bad usage, config or input (one line on stderr naming what is wrong);
1 a runtime failure.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import NoReturn

from worker import __version__
from worker.commands import cache, check, config_schema, emulator, explain, purge, replay, run
from worker.commands.args import HelpFormatter
from worker.config.load import load
from worker.config.settings import Config
from worker.errors import ConfigError, PermanentError, PurgeWorkerError, RetryableError, UsageError
from worker.observe import logs

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:
        # One line, as every bad input gets: argparse's default prints the whole usage too.
        self.exit(EXIT_USAGE, f"{self.prog}: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="purge-worker",
        description="Kafka events in, Cloudflare purges out.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--version", action="version", version=__version__)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    def command(name: str, help_text: str, needs_config: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(
            name, help=help_text, description=help_text, formatter_class=HelpFormatter
        )
        if needs_config:
            p.add_argument("-c", "--config", required=True, help="the YAML config file")
        return p

    run.add_arguments(command("run", "consume, purge and dead-letter until SIGTERM/SIGINT"))
    explain.add_arguments(command("explain", "print the purge plan one event produces"))
    check.add_arguments(command("check", "validate the config and rules (--online: Kafka, tokens)"))
    replay.add_arguments(command("replay", "re-drive records from a dead-letter topic"))
    purge.add_arguments(
        command("purge", "an ad-hoc purge through the worker's batching and limits")
    )
    cache.add_arguments(command("cache", "Cache Reserve, Tiered Cache and Variants settings"))
    emulator.add_arguments(
        command("emulator", "a local Cloudflare API emulator", needs_config=False)
    )
    config_schema.add_arguments(
        command("config-schema", "print the config file's JSON Schema", needs_config=False)
    )
    return parser


def _with_config(
    fn: Callable[[argparse.Namespace, Config], int], *, calls_api: bool = True
) -> Callable[[argparse.Namespace], int]:
    """Load the config (the same validation for every command), then run ``fn``.

    A command that calls the API fails before its first request when a token is missing, and
    ``check`` fails on it too, so ``check`` passes exactly when ``run`` can start."""

    def run(args: argparse.Namespace) -> int:
        config = load(args.config)
        logs.register_secrets(config.secrets())
        logs.configure(config.observability.log_format, config.observability.log_level)
        sends = calls_api and not getattr(args, "dry_run", False)
        if sends and not config.delivery.dry_run and config.missing_credentials():
            raise UsageError(config.missing_credentials()[0])
        return fn(args, config)

    return run


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _with_config(run.run),
    "explain": _with_config(explain.run, calls_api=False),
    "check": _with_config(check.run),
    # Replay's republish mode never calls the API; replay checks its own mode.
    "replay": _with_config(replay.run, calls_api=False),
    "purge": _with_config(purge.run),
    "cache": _with_config(cache.run),
    "emulator": emulator.run,
    "config-schema": config_schema.run,
}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    if not argv:
        parser.print_help(sys.stderr)
        return EXIT_USAGE
    args = parser.parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (ConfigError, UsageError) as exc:
        print(f"purge-worker {args.command}: {logs.redact_text(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except (PermanentError, RetryableError, PurgeWorkerError) as exc:
        print(f"purge-worker {args.command}: {logs.redact_text(str(exc))}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        return 130
