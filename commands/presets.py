"""`ditk presets list|show NAME`: what presets ship and what they resolve to."""

import contextlib

import click

from ._common import overrides_argument, preset_argument


@click.group("presets")
def command():
    """List shipped presets or show one fully resolved."""


@command.command("list")
@click.option("--names", is_flag=True, help="Print only the names, one a line (for scripts).")
def list_presets(names):
    """Print every shipped preset with its one-line description."""
    from ditk.config import preset_description, preset_names

    all_names = preset_names()
    width = max(map(len, all_names))
    for name in all_names:
        click.echo(name if names else f"{name:<{width}}  {preset_description(name)}".rstrip())


@contextlib.contextmanager
def _no_init():
    """torch.nn.init's in-place initialisers as no-ops: counting parameters needs shapes only, and on the meta
    device the first random init alone costs seconds (it loads torch's reference decompositions)."""
    import torch

    names = [n for n in dir(torch.nn.init) if n.endswith("_") and not n.startswith("_")]
    saved = {n: getattr(torch.nn.init, n) for n in names}
    try:
        for n in names:
            setattr(torch.nn.init, n, lambda tensor, *args, **kwargs: tensor)
        yield
    finally:
        for n, f in saved.items():
            setattr(torch.nn.init, n, f)


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

    with _no_init(), torch.device("meta"):  # shapes only: no memory, no initialisation
        model = build_model(cfg)
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    click.echo(f"# parameters: {total:,} ({trainable:,} trainable)")
    # Models with more to say (a mixture of experts: activated vs total) report it through parameter_report().
    report = model.parameter_report() if hasattr(model, "parameter_report") else {}
    for key, value in report.items():
        if key not in ("total", "trainable"):
            click.echo(f"# {key} parameters: {value:,} ({value / total:.1%} of total)")
