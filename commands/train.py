"""`ditk train PRESET [key=value ...]`: train a model, writing (or resuming) runs/<name>/."""

import sys
from pathlib import Path

import click

from ._common import overrides_argument, preset_argument, run_dir_options


@click.command("train")
@preset_argument()
@overrides_argument
@run_dir_options
def command(preset, overrides, run_dir, resume, no_progress):
    """Train PRESET (a name from `ditk presets list` or a YAML path) with KEY=VALUE overrides.

    \b
    Examples:
      ditk train digits-dit
      ditk train dit-xl-2 data.path=/data/imagenet/train autoencoder.path=/models/sd-vae-ft-ema
      torchrun --nproc_per_node 8 -m ditk train dit-b-2 ...   (DDP through accelerate)
      torchrun --nproc_per_node 8 -m ditk train dit-moe-g-2-16e2a ... train.distributed=fsdp   (sharded)

    Prints the run directory on stdout when done. Exit 75 when pre-empted (SIGTERM/SIGUSR1) and 130 on
    Ctrl-C: a checkpoint was saved and the same command resumes the run. Exit 1 when the loss or the
    gradient norm is not finite (nothing of that step is saved). One process owns a run directory at a time.
    """
    from ditk.config import resolve

    cfg = resolve(preset, overrides)  # a bad preset, key or value is reported before the training runtime loads
    path = Path(run_dir) if run_dir else Path(cfg.run.dir) / cfg.run.name
    from ditk.train import train_in_run_dir

    code = train_in_run_dir(cfg, path, resume, progress=not no_progress)
    click.echo(str(path))
    sys.exit(code)
