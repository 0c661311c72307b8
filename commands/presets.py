"""`ditk presets list|show NAME`: what presets ship and what they resolve to."""

import click

from ._common import overrides_argument, preset_argument


@click.group("presets")
def command():
    """List shipped presets or show one fully resolved."""


@command.command("list")
def list_presets():
    """Print the name of every shipped preset, one a line."""
    from ditk.config import preset_names

    for name in preset_names():
        click.echo(name)


@command.command("show")
@preset_argument("name")
@overrides_argument
def show(name, overrides):
    """Print preset NAME fully resolved (base chain, defaults, overrides) as YAML, with model size."""
    from ditk.config import resolve, to_yaml

    cfg = resolve(name, overrides, allow_missing=("data", "autoencoder", "distill"))
    click.echo(to_yaml(cfg), nl=False)
    import torch

    from ditk.build import build_model

    with torch.device("meta"):
        model = build_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    click.echo(f"# parameters: {total:,} ({trainable:,} trainable)")
    # Models with more to say (a mixture of experts: activated vs total) report it through parameter_report().
    report = model.parameter_report() if hasattr(model, "parameter_report") else {}
    for key, value in report.items():
        if key not in ("total", "trainable"):
            click.echo(f"# {key} parameters: {value:,} ({value / total:.1%} of total)")
