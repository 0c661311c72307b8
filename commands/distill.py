"""`ditk distill PRESET [key=value ...]`: distill a teacher run into a student run (runs/<name>/)."""

import sys
from pathlib import Path

import click

from ._common import overrides_argument, preset_argument, run_dir_options


@click.command("distill")
@preset_argument()
@overrides_argument
@run_dir_options
def command(preset, overrides, run_dir, resume, no_progress):
    """Distill the teacher run `distill.teacher` into a student with the method `distill.method`.

    \b
    Examples:
      ditk distill digits-dit-cd distill.teacher=runs/digits-dit          (4-step consistency student)
      ditk distill digits-dit distill.method=kd distill.teacher=runs/digits-dit distill.student=small.yaml
      ditk sample runs/digits-dit-cd                                      (samples with the student's solver/steps)
      ditk distill tones-musiccm distill.teacher=runs/tones-fluxmusic     (MusicCM: 4-step text-to-music student)
      ditk distill digits-dit-lcm && ditk sample runs/digits-dit-lcm --cfg-scale 3   (w embedded: one forward/step)

    The student is an ordinary run (checkpoints, resume, pre-emption, DDP as `ditk train`) whose
    lineage.json names the teacher. Prints the run directory on stdout. Exit 75 when pre-empted.
    """
    from ditk.distill.prepare import prepare
    from ditk.train import train_in_run_dir

    cfg, teacher = prepare(preset, overrides)
    path = Path(run_dir) if run_dir else Path(cfg.run.dir) / cfg.run.name
    code = train_in_run_dir(cfg, path, resume, progress=not no_progress, parent=teacher)
    click.echo(str(path))
    sys.exit(code)
