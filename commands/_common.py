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
