"""`ditk distill PRESET [key=value ...]`: distill a teacher run into a student run (runs/<name>/)."""

import sys
from pathlib import Path

import click

from ._common import overrides_argument, preset_argument


@click.command("distill")
@preset_argument()
@overrides_argument
@click.option("--run-dir", type=click.Path(file_okay=False), help="Run directory (default: <run.dir>/<run.name>).")
@click.option("--resume/--no-resume", default=None,
              help="Default: resume automatically when the run directory exists. --no-resume refuses to touch an existing run.")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr (logs still go there).")
def command(preset, overrides, run_dir, resume, no_progress):
    """Distill the teacher run `distill.teacher` into a student with the method `distill.method`.

    \b
    Examples:
      ditk distill digits-dit-cd distill.teacher=runs/digits-dit          (4-step consistency student)
      ditk distill digits-dit distill.method=kd distill.teacher=runs/digits-dit distill.student=small.yaml
      ditk sample runs/digits-dit-cd                                      (samples with the student's solver/steps)

    The student is an ordinary run (checkpoints, resume, pre-emption, DDP as `ditk train`) whose
    lineage.json names the teacher. Prints the run directory on stdout. Exit 75 when pre-empted.
    """
    from ditk.distill.prepare import prepare
    from ditk.train import prepare_run_dir, train

    cfg, teacher = prepare(preset, overrides)
    path = Path(run_dir) if run_dir else Path(cfg.run.dir) / cfg.run.name
    cfg = prepare_run_dir(cfg, path, resume, parent=teacher)
    code = train(cfg, path, progress=not no_progress)
    click.echo(str(path))
    sys.exit(code)
