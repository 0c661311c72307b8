"""`ditk distill`: few-step or smaller students from a frozen ditk teacher, inside the one training loop.

A distillation method is a DISTILL_METHODS entry (one file each: kd, consistency, progressive, reflow, dmd2,
musiccm). The run's `distill:` config section selects it (`distill.method`) and names the teacher (`distill.teacher`, a ditk run or
checkpoint). `ditk.train` wraps the run's objective (the teacher's: ddpm or rectified-flow) in the method with
`build_method`; the wrapper is what the loop calls `training_losses` on, and it delegates everything else
(sampling, schedulers) to the objective, so the student is an ordinary run of that objective.
"""

from __future__ import annotations

from ..registry import DISTILL_METHODS


def build_method(cfg, objective):
    """The distillation method of `cfg.distill` wrapped around the run's objective (`cfg` is the whole run config)."""
    from omegaconf import OmegaConf

    section = cfg.distill
    options = OmegaConf.masked_copy(section, [k for k in section.keys() if k != "method"])
    return DISTILL_METHODS.build(section.method, options, objective, cfg)
