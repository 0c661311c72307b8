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

    Prints the run directory on stdout when done. Exit 75 when pre-empted (SIGTERM/SIGUSR1) and 130 on
    Ctrl-C: a checkpoint was saved and the same command resumes the run. Exit 1 when the loss or the
    gradient norm is not finite (nothing of that step is saved). One process owns a run directory at a time.
    """
    from ditk.config import resolve

    cfg = resolve(preset, overrides)  # a bad preset, key or value is reported before the training runtime loads
    path = Path(run_dir) if run_dir else Path(cfg.run.dir) / cfg.run.name
    from ditk.runs import RunDir, is_main_rank
    from ditk.train import prepare_run_dir, train

    run = RunDir(path)
    created = not path.exists()
    top = path  # the outermost folder this command creates (runs/ on a first run)
    while not top.parent.exists() and top.parent != top.parent.parent:
        top = top.parent
    with run.lock():
        try:
            cfg = prepare_run_dir(cfg, path, resume)
            code = train(cfg, path, progress=not no_progress)
        except BaseException:
            # A run that fails before its first step (a bad data.path, ...) leaves nothing behind to block the
            # corrected command (and one with steps but no checkpoint is started afresh by prepare_run_dir).
            if created and is_main_rank() and not run.list_checkpoints() and not run.metrics.is_file():
                import shutil

                shutil.rmtree(path, ignore_errors=True)
                for folder in path.parents:  # and the parents it made, if still empty
                    if folder == top.parent:
                        break
                    try:
                        folder.rmdir()
                    except OSError:
                        break
            raise
    click.echo(str(path))
    sys.exit(code)
