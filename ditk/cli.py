"""The `ditk` entry point: a click group whose subcommands live in `commands/` (installed as ditk.commands).

Subcommand modules are imported only when needed, and none of them imports torch at import time, so
`ditk --help` and shell completion stay fast.
"""

from __future__ import annotations

import importlib
import sys

import click

from . import __version__
from .errors import EXIT_USAGE, DitkError

# command name -> module in ditk.commands exposing a click command called `command`
COMMANDS = {
    "train": "train",
    "sample": "sample",
    "presets": "presets",
    "evaluate-fid": "evaluate_fid",
    "restore": "restore",
    "distill": "distill",
    "prune": "prune",
    "invert": "invert",
    "edit": "edit",
    "quantize": "quantize",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module = importlib.import_module(f"ditk.commands.{COMMANDS[name]}")
        return module.command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ditk")
def cli():
    """ditk: train, sample, distill and evaluate diffusion transformers.

    Every command reads a preset (a name from `ditk presets list` or a YAML path) and takes
    key=value overrides. Results go to stdout, progress and logs to stderr.

    Exit codes: 0 ok, 1 failure (a traceback, or one line for a failed run), 2 bad input (one line),
    75 pre-empted (checkpoint saved; requeue), 130 interrupted (training: checkpoint saved).
    """


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def main(argv=None):
    """Run the CLI. Every error is one line on stderr: `error: ...`, exit 2 for bad input (click's usage errors
    included, converted here so that every command, present and future, has one error style) and 1 for a
    run that failed (DitkError.exit_code)."""
    try:
        cli.main(args=argv, prog_name="ditk", standalone_mode=False)
    except DitkError as e:
        click.echo(f"error: {_one_line(e)}", err=True)
        sys.exit(e.exit_code)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.UsageError as e:  # a missing argument, an unknown option, a value out of range, ...
        where = e.ctx.command_path if e.ctx is not None else "ditk"
        click.echo(f"error: {_one_line(e.format_message())} (see `{where} --help`)", err=True)
        sys.exit(EXIT_USAGE)
    except click.ClickException as e:
        click.echo(f"error: {_one_line(e.format_message())}", err=True)
        sys.exit(EXIT_USAGE if e.exit_code == 2 else e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        click.echo("interrupted", err=True)
        sys.exit(130)
    sys.exit(0)
