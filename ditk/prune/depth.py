"""Depth pruning: pick the kept blocks with one method, then build the smaller model.

score  - Block Influence or oracle loss increase on the calibration batches (`score.py`)
index  - the user's `prune.keep_indices`
random - a seeded random choice of the same shape (the baseline)
learnable - TinyFusion's Gumbel N:M search with LoRA (`learnable.py`)
"""

from __future__ import annotations

from omegaconf import DictConfig

from .layout import layout_for
from .score import (block_influence, index_units, oracle_loss_increase, random_units, select,
                    unit_scores_from_blocks)
from .surgery import depth_pruned


def choose_blocks(model, cfg: DictConfig, calib, batches, log):
    from .run import model_section

    p = cfg.prune
    name, section = cfg.model.name, model_section(cfg)
    layout = layout_for(name, section)
    report: dict = {"units": [list(u) for u in layout.units], "fixed_blocks": layout.fixed}
    if p.method == "score" and p.criterion == "bi":
        blocks = block_influence(model, layout, [lambda b=b: calib.loss(model, b) for b in batches])
        scores = unit_scores_from_blocks(layout, blocks)
        kept_units = select(scores, layout, int(p.keep), str(p.pattern))
        report.update(criterion="bi", block_influence=blocks, unit_scores=scores)
    elif p.method == "score":
        full, scores = oracle_loss_increase(model, layout, [lambda b=b: calib.loss(model, b) for b in batches])
        kept_units = select(scores, layout, int(p.keep), str(p.pattern))
        report.update(criterion="oracle", full_loss=full, loss_increase=scores, unit_scores=scores)
    elif p.method == "index":
        kept_units = index_units(layout, list(p.keep_indices))
    elif p.method == "random":
        kept_units = random_units(layout, int(p.seed), int(p.keep), str(p.pattern))
        report["seed"] = int(p.seed)
    else:
        from .learnable import learn_mask

        kept_units, info = learn_mask(model, layout, cfg, calib, log)
        report.update(info)
    kept = layout.kept_blocks(kept_units)
    small, new_section = depth_pruned(model, name, section, kept)
    removed = [i for i in range(layout.num_blocks) if i not in kept]
    log(f"keeping blocks {kept} of {layout.num_blocks} (removed {removed})")
    report.update(kept_blocks=kept, removed_blocks=removed, depth_before=layout.num_blocks, depth_after=len(kept))
    return small.eval(), new_section, report
