"""`ditk train PRESET [key=value ...]`: train a model, writing (or resuming) runs/<name>/."""

import sys
from pathlib import Path

import click

from ._common import overrides_argument, preset_argument


@click.command("train")
@preset_argument()
@overrides_argument
@click.option("--run-dir", type=click.Path(file_okay=False), help="Run directory (default: <run.dir>/<run.name>).")
@click.option("--resume/--no-resume", default=None,
              help="Default: resume automatically when the run directory exists. --no-resume refuses to touch an existing run.")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr (logs still go there).")
def command(preset, overrides, run_dir, resume, no_progress):
    """Train PRESET (a name from `ditk presets list` or a YAML path) with KEY=VALUE overrides.

    \b
    Examples:
      ditk train digits-dit
      ditk train dit-xl-2 data.path=/data/imagenet/train autoencoder.path=/models/sd-vae-ft-ema
      torchrun --nproc_per_node 8 -m ditk train dit-b-2 ...   (DDP through accelerate)

    Prints the run directory on stdout when done. Exit 75 when pre-empted (SIGTERM/SIGUSR1): a
    checkpoint was saved and the same command resumes the run.
    """
    from ditk.config import resolve
    from ditk.train import prepare_run_dir, train

    cfg = resolve(preset, overrides)
    path = Path(run_dir) if run_dir else Path(cfg.run.dir) / cfg.run.name
    cfg = prepare_run_dir(cfg, path, resume)
    code = train(cfg, path, progress=not no_progress)
    click.echo(str(path))
    sys.exit(code)
