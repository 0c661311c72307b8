"""Pieces shared by the command modules (kept torch-free: they run for help and completion too)."""

from __future__ import annotations

import click
from click.shell_completion import CompletionItem


def complete_presets(ctx, param, incomplete):
    from ditk.config import preset_names

    return [CompletionItem(n) for n in preset_names() if n.startswith(incomplete)]


def preset_argument(name: str = "preset"):
    return click.argument(name, shell_complete=complete_presets)


overrides_argument = click.argument("overrides", nargs=-1, metavar="[KEY=VALUE]...")


def run_dir_options(fn):
    """--run-dir, --resume/--no-resume and --no-progress of the commands that train into a run (train, distill)."""
    fn = click.option("--no-progress", is_flag=True, help="No progress bar on stderr (logs still go there).")(fn)
    fn = click.option("--resume/--no-resume", default=None,
                      help="Default: resume automatically when the run directory exists. --no-resume refuses to "
                           "touch an existing run.")(fn)
    return click.option("--run-dir", type=click.Path(file_okay=False),
                        help="Run directory (default: <run.dir>/<run.name>).")(fn)


def parse_options(opts) -> dict:
    """--opt KEY=VALUE pairs -> {key: number or string}."""
    from ditk.errors import ConfigError

    out = {}
    for opt in opts:
        if "=" not in opt or opt.startswith("="):
            raise ConfigError(f"--opt '{opt}' is not KEY=VALUE (e.g. --opt gamma=0.5)")
        key, value = opt.split("=", 1)
        try:
            out[key] = float(value) if any(c in value for c in ".eE") else int(value)
        except ValueError:
            out[key] = value
    return out


def split_overrides(items) -> tuple[list, list]:
    """IMAGES... [KEY=VALUE]...: an item with '=' that is not an existing path is a config override."""
    import os

    inputs = [i for i in items if "=" not in i or os.path.exists(i)]
    overrides = [i for i in items if "=" in i and not os.path.exists(i)]
    if not inputs:
        from ditk.errors import ConfigError

        raise ConfigError("no input images given: pass image files, a folder, or .safetensors artefacts")
    return inputs, overrides
