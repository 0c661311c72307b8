"""`ditk prune PRESET prune.source=RUN [key=value ...]`: a smaller model, written as an ordinary run."""

import sys
from pathlib import Path

import click

from ._common import overrides_argument, preset_argument


@click.command("prune")
@preset_argument()
@overrides_argument
@click.option("--run-dir", type=click.Path(file_okay=False), help="Output run directory (default: <run.dir>/<run.name>).")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr (logs still go there).")
def command(preset, overrides, run_dir, no_progress):
    """Prune the model of prune.source (a run, one of its checkpoints, or weights) described by PRESET.

    \b
    Methods (prune.method):
      score      Block Influence (prune.criterion=bi) or loss increase (prune.criterion=oracle)
      index      keep prune.keep_indices=[0,2,...]
      random     a seeded random choice (baseline)
      learnable  TinyFusion: Gumbel N:M mask search co-trained with LoRA
      experts    DiT-MoE: drop the least-used routed experts (prune.experts_keep=N)
      width      Taylor importance of MLP channels (prune.mlp_keep=N channels per block)
      heads      Taylor importance of attention heads (prune.heads_keep=K per block; prune.heads_scope=global
                 ranks K x depth heads over all blocks, so blocks keep different counts)
    Depth target: prune.keep=N blocks, or prune.pattern=N:M (keep N of every M).
    prune.recover_steps=N fine-tunes the pruned model with the source as teacher (KD).

    \b
    Examples:
      ditk prune digits-dit-prune                        (source runs/digits-dit-deep, keep 4 of 8)
      ditk prune digits-dit-prune prune.method=learnable prune.pattern=1:2 run.name=tiny
      ditk prune tinyfusion-dit-xl-2-2to4 prune.source=DiT-XL-2-256x256.pt ...

    Writes runs/<name>/ (config.yaml with the real depth, checkpoints/, pruning.json, lineage.json) and prints
    its path on stdout. Exit 75 when the recovery is pre-empted: resume it with
    `ditk train runs/<name>/config.yaml --run-dir runs/<name>`.
    """
    from ditk.config import resolve

    # YAML 1.1 reads an unquoted 2:4 as the sexagesimal number 124: keep the pattern a string.
    overrides = [f"prune.pattern='{o.split('=', 1)[1]}'" if o.startswith("prune.pattern=") and "'" not in o else o
                 for o in overrides]
    # A target given on the command line replaces the preset's (prune.keep and prune.pattern exclude each other).
    given = {o.split("=", 1)[0] for o in overrides}
    if "prune.pattern" in given and "prune.keep" not in given:
        overrides.append("prune.keep=0")
    if "prune.keep" in given and "prune.pattern" not in given:
        overrides.append("prune.pattern=''")
    cfg = resolve(preset, overrides)
    out = Path(run_dir) if run_dir else Path(cfg.run.dir) / cfg.run.name
    from ditk.prune.run import check_request

    check_request(cfg, out)  # bad input: one line, nothing written, before torch is imported
    from ditk.prune.run import prune

    report = prune(cfg, out, progress=not no_progress)
    click.echo(str(out))
    sys.exit(report.get("recovery_exit_code", 0))  # 75: recovery pre-empted (checkpoint saved; resume with ditk train)
