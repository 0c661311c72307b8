"""Knowledge distillation of a diffusion model: output KD, the diffusion loss, and masked block-feature KD.

TinyFusion's recovery loss (Fang et al., CVPR 2025, "TinyFusion: Diffusion Transformers Learned Shallow",
`train_masked_kd.py`), for ε- and velocity-predicting models alike:

    L = out_weight · ‖out_s − out_t‖²  +  diff_weight · ‖out_s[:C] − target‖²
        + β(step) · Σ_blocks ‖m_s ⊙ h_s − m_t ⊙ h_t‖²

out = the model output (ε and, for a learned variance, its variance channels; or the velocity), target = the
diffusion target (ε, or ε − x0), h = a block's output (read through forward hooks on `model.blocks`, the hook
points every ditk backbone has), and m = 1 where |h − μ| < k σ, μ and σ the mean and standard deviation of that
block's activations in the batch (k = mask_sigma = 2): the *massive activations* of a few channels are dropped
from the feature loss, which they would otherwise dominate. β decays linearly from feature_weight (1e-2) to 0 at feature_decay_steps.
Defaults are TinyFusion's: 0.9 / 0.1 / 1e-2. Every term is a per-sample mean over elements (the MSE of DiT's loss).

As a function (what `ditk prune` calls for recovery):

    from ditk.distill.kd import kd_loss
    losses = kd_loss(student, teacher, x_t, t_model, {"y": y}, target=eps, feature_weight=1e-2)
    losses["loss"].mean().backward()      # losses: loss, out_kd, diff, feat — each (N,)

`block_map[i]` is the teacher block whose output student block i imitates (a pruned student: the kept indices);
by default blocks are matched proportionally (student depth 2 of teacher depth 4: blocks 1 and 3). `FeatureKD`
is the hook helper alone: `with FeatureKD(student, teacher) as fkd: student(...); teacher(...); fkd.loss()`.

As the `kd` method: `ditk distill digits-dit distill.method=kd distill.teacher=runs/digits-dit
distill.student=... ` trains the student on the run's data with this loss.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import List, Optional, Sequence

import torch
import torch.nn as nn

from ..errors import ConfigError
from ..hooks import blocks
from ..registry import DISTILL_METHODS
from .base import DistillConfig, Distiller, forward_process


def proportional_block_map(student_depth: int, teacher_depth: int) -> list[int]:
    """Student block i imitates teacher block round((i + 1) · Dt / Ds) − 1: the last blocks always correspond."""
    return [max(0, round((i + 1) * teacher_depth / student_depth) - 1) for i in range(student_depth)]


def _tensor(output) -> torch.Tensor:
    """A block's output tensor (blocks of two-stream models return (image tokens, text tokens): the first)."""
    return output[0] if isinstance(output, (tuple, list)) else output


def massive_activation_mask(h: torch.Tensor, k: float) -> torch.Tensor:
    """1 where |h − μ| < k σ (μ, σ over all of this block's activations in the batch), else 0; k <= 0: all ones."""
    if k <= 0:
        return torch.ones_like(h)
    h = h.detach()
    mu, sigma = h.mean(), h.std()
    return ((h - mu).abs() < k * sigma).to(h.dtype)


class FeatureKD:
    """Forward hooks that record the block outputs of a student and a teacher, and the masked feature loss."""

    def __init__(self, student: nn.Module, teacher: nn.Module, block_map: Optional[Sequence[int]] = None,
                 mask_sigma: float = 2.0):
        self.student_blocks = blocks(getattr(student, "module", student))  # DDP-wrapped students too
        self.teacher_blocks = blocks(teacher)
        ds, dt = len(self.student_blocks), len(self.teacher_blocks)
        self.block_map = list(block_map) if block_map else proportional_block_map(ds, dt)
        if len(self.block_map) != ds or not all(0 <= j < dt for j in self.block_map):
            raise ConfigError(f"distill.block_map must give one teacher block (0..{dt - 1}) per student block "
                              f"({ds}), got {self.block_map}")
        self.mask_sigma = float(mask_sigma)
        self.h_s: dict[int, torch.Tensor] = {}
        self.h_t: dict[int, torch.Tensor] = {}
        self._handles = []

    def __enter__(self) -> "FeatureKD":
        def keep(store, key):
            def hook(module, inputs, output):
                store[key] = _tensor(output)
            return hook

        for i, block in enumerate(self.student_blocks):
            self._handles.append(block.register_forward_hook(keep(self.h_s, i)))
        for j in sorted(set(self.block_map)):
            self._handles.append(self.teacher_blocks[j].register_forward_hook(keep(self.h_t, j)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def loss(self) -> torch.Tensor:
        """(N,): Σ over student blocks of the per-sample mean of (m_s h_s − m_t h_t)² against the mapped teacher
        block; then the recorded outputs are dropped."""
        total = None
        for i, j in enumerate(self.block_map):
            h_s, h_t = self.h_s[i], self.h_t[j].detach()
            if h_s.shape != h_t.shape:
                raise ConfigError(f"feature KD needs equal block outputs: student block {i} gives {tuple(h_s.shape)}, "
                                  f"teacher block {j} {tuple(h_t.shape)}; set distill.feature_weight=0")
            diff = massive_activation_mask(h_s, self.mask_sigma) * h_s - massive_activation_mask(h_t, self.mask_sigma) * h_t
            term = diff.pow(2).flatten(1).mean(1)
            total = term if total is None else total + term
        self.h_s.clear()
        self.h_t.clear()
        return total


def kd_loss(student: nn.Module, teacher: nn.Module, x_t: torch.Tensor, t_model: torch.Tensor, cond: dict,
            target: Optional[torch.Tensor] = None, *, out_weight: float = 0.9, diff_weight: float = 0.1,
            feature_weight: float = 0.0, block_map: Optional[Sequence[int]] = None, mask_sigma: float = 2.0) -> dict:
    """TinyFusion's KD loss at one noisy batch; see the module docstring. Returns per-sample (N,) tensors:
    loss, out_kd, diff (zeros without a target), feat (zeros when feature_weight is 0).

    x_t: the noisy inputs; t_model: the model time (objective.model_time(t)); cond: the model's keyword
    arguments (the same for both); target: the diffusion target of the first C output channels (ε or ε − x0)."""
    use_features = feature_weight > 0
    fkd = FeatureKD(student, teacher, block_map, mask_sigma) if use_features else None
    with fkd if fkd is not None else contextlib.nullcontext():
        out_s = student(x_t, t_model, **cond)
        with torch.no_grad():
            out_t = teacher(x_t, t_model, **cond)
        feat = fkd.loss() if fkd is not None else out_s.new_zeros(len(out_s))
    k = min(out_s.shape[1], out_t.shape[1])
    out_kd = (out_s[:, :k] - out_t[:, :k].detach()).pow(2).flatten(1).mean(1)
    if target is not None:
        diff = (out_s[:, : target.shape[1]] - target).pow(2).flatten(1).mean(1)
    else:
        diff = torch.zeros_like(out_kd)
    loss = out_weight * out_kd + diff_weight * diff + feature_weight * feat
    return {"loss": loss, "out_kd": out_kd.detach(), "diff": diff.detach(), "feat": feat.detach()}


@dataclass
class KDConfig(DistillConfig):
    out_weight: float = 0.9  # TinyFusion: 0.9 ‖ε_s − ε_t‖²
    diff_weight: float = 0.1  # ... + 0.1 L_diff
    feature_weight: float = 1e-2  # β of the block-feature term at step 0 (TinyFusion 1e-2) ...
    # ... decaying linearly to 0 at this step. A fixed number rather than train.max_steps, so that a run extended by
    # raising max_steps (a resumable key) computes the same steps as one started with the larger value.
    feature_decay_steps: int = 10_000
    mask_sigma: float = 2.0  # drop activations with |h − μ| >= mask_sigma · σ (massive activations); 0: keep all
    block_map: List[int] = field(default_factory=list)  # teacher block per student block; []: proportional


@DISTILL_METHODS.register("kd", config=KDConfig,
                          help="output + masked block-feature knowledge distillation (TinyFusion)")
class KD(Distiller):
    def __init__(self, options, objective, cfg):
        super().__init__(options, objective, cfg)
        self.beta = float(options.feature_weight)
        if min(options.out_weight, options.diff_weight, options.feature_weight) < 0:
            raise ConfigError("distill.out_weight, diff_weight and feature_weight must be >= 0")

    def begin_step(self, model, step: int, max_steps: int) -> None:
        """The feature weight of this step: linear decay to 0 (a pure function of the step, so resumes are exact)."""
        end = max(int(self.options.feature_decay_steps), 1)
        self.beta = float(self.options.feature_weight) * max(0.0, 1.0 - step / end)

    def training_losses(self, model, x0, t, noise, model_kwargs=None) -> dict:
        x_t, target = forward_process(self.base, x0, t, noise)
        o = self.options
        return kd_loss(model, self.teacher, x_t, self.base.model_time(t), model_kwargs or {}, target,
                       out_weight=float(o.out_weight), diff_weight=float(o.diff_weight), feature_weight=self.beta,
                       block_map=list(o.block_map) or None, mask_sigma=float(o.mask_sigma))
