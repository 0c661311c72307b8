"""Recovery: fine-tune the pruned run with its source as the teacher, through the ordinary training loop.

The pruned run gets a `distill` section (`ditk.distill.kd`: TinyFusion's 0.9 output KD + 0.1 diffusion loss +
masked block-feature KD with the 2-sigma mask, weight 1e-2 decaying to 0 over the recovery) whose block map
pairs pruned block j with the source block it came from, then `ditk.train.train` runs it from the pruned
checkpoint (step 0) to `prune.recover_steps`: checkpoints, EMA, resume and pre-emption are the loop's. An
interrupted recovery resumes with `ditk train runs/<name>/config.yaml --run-dir runs/<name>`.

A bare weights file as prune.source (an official `.pt`, a `.safetensors`) has no run to be the teacher: `ditk
prune` writes it as one, `runs/<name>/teacher/` (the preset's config.yaml, the source's weights as its only
checkpoint), and points the KD there.

Learning rate: TinyFusion's issue #9 (KD diverges after changing the batch but not the LR). By default the LR is
optim.lr x train.global_batch_size / prune.lr_reference_batch (linear scaling from the batch optim.lr was tuned
for); `prune.recover_lr` sets it outright. The command logs which.
"""

from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from ..errors import ConfigError


def recovery_lr(cfg: DictConfig) -> tuple[float, str]:
    p = cfg.prune
    if p.recover_lr > 0:
        return float(p.recover_lr), f"prune.recover_lr={p.recover_lr:g} (given; not scaled)"
    batch, ref = int(cfg.train.global_batch_size), int(p.lr_reference_batch)
    if ref < 1:
        raise ConfigError("prune.lr_reference_batch must be >= 1 (the global batch optim.lr was tuned for)")
    lr = float(cfg.optim.lr) * batch / ref
    return lr, (f"optim.lr {cfg.optim.lr:g} x global batch {batch} / reference batch {ref} = {lr:g} "
                "(linear LR scaling; set prune.lr_reference_batch or prune.recover_lr to change it)")


def recovery_sections(cfg: DictConfig, block_map: list[int], teacher: Path) -> tuple[dict, dict, str]:
    """(distill section, train/optim changes, LR note) for a recovery of prune.recover_steps steps from the
    teacher run `teacher` (the source run, or the source weights written as a run)."""
    p = cfg.prune
    lr, note = recovery_lr(cfg)
    distill = {"method": "kd", "teacher": str(Path(teacher).resolve()), "student": "", "out_weight": 0.9,
               "diff_weight": 0.1, "feature_weight": 1e-2, "feature_decay_steps": int(p.recover_steps),
               "mask_sigma": 2.0, "block_map": list(block_map)}
    return distill, {"lr": lr, "max_steps": int(p.recover_steps)}, note
