"""TinyFusion (Fang et al., CVPR 2025): learn which N of every M consecutive blocks to keep, for recoverability.

Per group of M units, a categorical over the C(M, N) keep-masks with logits = parameter x scaling (TinyFusion
scales by 1e2, parameters start at 0.02, so all masks start equally likely). Each training sample draws a mask by
hard Gumbel-softmax with a straight-through estimator: the forward gate is exactly 0 or 1 (a dropped block is
the identity, through `gates`), the backward pass sees the softmax. The temperature anneals linearly 4 -> 0.1,
the logit scaling linearly from `logit_scale` to `logit_scale_end` (TinyFusion's --scaling-range, default 1e2 ->
1e2: constant). LoRA (rank 8) is trained with the mask on the run's diffusion loss, so a mask wins when the model
can recover from it, not only when removing it hurts least right now. As in `prune_by_learning.py`, an EMA of the
mask logits (decay 0.999, started from the initial logits, updated after every step) makes the decision: the
exported mask of every group is the argmax of the EMA logits, and the reported probabilities / confidence are
softmax(EMA logits x the final scaling). A step whose loss is NaN is skipped (no update), as there.
The LoRA is then discarded (the pruned model starts from the source's weights; recovery fine-tunes it).
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn as nn

from ..hooks import attach
from .gates import gate_hooks
from .layout import Layout
from .lora import LoRA
from .score import target_units


def keep_masks(m: int, n: int) -> torch.Tensor:
    """(C(m, n), m) 0/1 rows: every way to keep n of m units, in lexicographic order of the kept indices."""
    rows = [[1.0 if j in kept else 0.0 for j in range(m)] for kept in itertools.combinations(range(m), n)]
    return torch.tensor(rows)


class MaskSearch(nn.Module):
    def __init__(self, num_units: int, n: int, m: int, init: float = 0.02):
        super().__init__()
        self.n, self.m = n, m
        self.register_buffer("options", keep_masks(m, n))
        self.logits = nn.Parameter(torch.full((num_units // m, len(self.options)), init))
        self.register_buffer("ema_logits", self.logits.detach().clone())  # TinyFusion decides from this EMA

    @torch.no_grad()
    def update_ema(self, decay: float) -> None:
        """ema <- decay * ema + (1 - decay) * logits (decay 0: the EMA is the current logits)."""
        self.ema_logits.mul_(decay).add_(self.logits.detach(), alpha=1.0 - decay)

    def sample(self, batch: int, tau: float, scale: float, generator: torch.Generator) -> torch.Tensor:
        """(batch, units) gates, exactly 0/1 in value, with the straight-through Gumbel-softmax gradient."""
        logits = self.logits * scale  # (G, C)
        u = torch.rand((batch, *logits.shape), generator=generator).clamp(1e-10, 1.0 - 1e-7)
        soft = torch.softmax((logits - torch.log(-torch.log(u))) / tau, dim=-1)  # (B, G, C)
        hard = torch.zeros_like(soft).scatter_(-1, soft.argmax(-1, keepdim=True), 1.0)
        # value: hard exactly (soft - soft.detach() is exactly 0); gradient: that of soft.
        one_hot = hard + (soft - soft.detach())
        gates = one_hot @ self.options  # (B, G, M): one 1 in the one-hot picks one 0/1 mask row exactly
        return gates.reshape(batch, -1)

    def probabilities(self, scale: float) -> torch.Tensor:
        """Per group, the mask probabilities softmax(EMA logits x scale)."""
        return torch.softmax(self.ema_logits * scale, dim=-1)

    def decision(self) -> list[int]:
        """Kept unit indices: the argmax mask of every group, by the EMA logits."""
        kept = []
        for g, choice in enumerate(self.ema_logits.argmax(-1).tolist()):
            kept += [g * self.m + j for j in range(self.m) if self.options[choice, j] > 0]
        return kept


def linear(start: float, end: float, step: int, steps: int) -> float:
    """TinyFusion's linear schedules (tau, scaling): start at step 0, end at the last step."""
    return start + (end - start) * step / max(steps - 1, 1)


def search_mask(model, layout: Layout, n: int, m: int, loss_fn, steps: int, lr: float = 1e-4,
                gate_lr_scale: float = 10.0, lora_rank: int = 8, lora_alpha: float = 16.0, tau_start: float = 4.0,
                tau_end: float = 0.1, scale: float = 100.0, seed: int = 0, log=None, batch_of=None,
                scale_end: float = 0.0, ema_decay: float = 0.999):
    """Learn the N:M mask over `layout.units`. loss_fn(step) runs the model once and returns the loss; `batch_of`
    (step) says how many samples that forward has (one mask per sample). scale_end > 0 anneals the logit scaling
    linearly from `scale` to it (0: constant). Returns (kept units, info dict)."""
    search = MaskSearch(len(layout.units), n, m)
    lora = LoRA(model, lora_rank, lora_alpha) if lora_rank > 0 else None
    groups = [{"params": [search.logits], "lr": lr * gate_lr_scale}]
    if lora is not None:
        groups.insert(0, {"params": list(lora.parameters()), "lr": lr})
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    history = []
    scale_end = scale_end if scale_end > 0 else scale
    skipped = 0
    for step in range(steps):
        tau = linear(tau_start, tau_end, step, steps)
        scaling = linear(scale, scale_end, step, steps)
        gates = search.sample(batch_of(step), tau, scaling, gen)  # (B, units)
        block_gates = {b: gates[:, u] for u, unit in enumerate(layout.units) for b in unit}
        with attach(model, {**gate_hooks(layout, block_gates), **(lora.hooks() if lora else {})}):
            loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if torch.isfinite(loss):
            torch.nn.utils.clip_grad_norm_([q for g in groups for q in g["params"]], 1.0)
            opt.step()
        else:
            skipped += 1
        search.update_ema(ema_decay)
        history.append(float(loss.detach()))
        if log and (step + 1) % max(1, steps // 5) == 0:
            log(f"search step {step + 1}/{steps}: loss {sum(history[-10:]) / len(history[-10:]):.4f}, tau {tau:.2f}, "
                f"mask {search.decision()}")
    probs = search.probabilities(scale_end)
    info = {"pattern": f"{n}:{m}", "keep_masks": search.options.tolist(), "mask_probabilities": probs.tolist(),
            "confidence": probs.max(-1).values.tolist(), "mask_logits_ema": search.ema_logits.tolist(),
            "mask_logits_final": search.logits.detach().tolist(), "mask_ema_decay": ema_decay,
            "logit_scale": [scale, scale_end], "search_loss_first": history[:10], "search_loss_last": history[-10:],
            "search_steps": steps, "skipped_nan_steps": skipped, "lora_rank": lora_rank}
    return search.decision(), info


def learn_mask(model, layout: Layout, cfg, calib, log):
    """The command's search: the run's diffusion loss on fresh seeded batches, TinyFusion's defaults."""
    p = cfg.prune
    count, n, m = target_units(layout, int(p.keep), str(p.pattern))
    if m is None:  # prune.keep=K: one group of all units (keep K of them), as TinyFusion's custom groups allow
        n, m = count, len(layout.units)
        if math.comb(m, n) > 4096:
            from ..errors import ConfigError

            raise ConfigError(f"prune.keep={p.keep} gives C({m},{n}) = {math.comb(m, n)} masks in one group: use "
                              "prune.pattern=N:M (TinyFusion's local groups), e.g. 1:2 or 2:4")
    model.requires_grad_(False)
    batches = {}

    def loss_fn(step):
        batches[step] = calib.batch(int(p.seed) + 1, step, int(p.search_batch_size))  # not the scoring batches
        return calib.loss(model, batches.pop(step))

    kept, info = search_mask(model, layout, n, m, loss_fn, int(p.search_steps), float(p.search_lr),
                             float(p.gate_lr_scale), int(p.lora_rank), float(p.lora_alpha), float(p.tau_start),
                             float(p.tau_end), float(p.logit_scale), int(p.seed), log,
                             batch_of=lambda step: int(p.search_batch_size), scale_end=float(p.logit_scale_end),
                             ema_decay=float(p.mask_ema_decay))
    return kept, info
