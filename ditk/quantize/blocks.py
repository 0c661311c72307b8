"""Block-wise reconstruction (BRECQ, Li et al. ICLR 2021): tune the quantization of the linears inside one
transformer block so that the block's output matches the full-precision block's output on calibration inputs,

    min_θ  E ‖ f_block(X; Ŵ(θ)) − f_block(X; W) ‖²  (+ a method's regulariser),

one block at a time. Used by PTQ4DiT (AdaRound rounding, `ditk.quantize.adaround`) and VQ4DiT (codeword ratios).

A "block" is an item of the outermost nn.ModuleList above a quantized layer (`blocks.3` for `blocks.3.attn.qkv`).
Its inputs and full-precision outputs are recorded once, by hooks, while the full-precision model runs over the
calibration set; every block is then reconstructed against those inputs (the full-precision model's, not the
quantized predecessor's as in BRECQ: our choice, which makes blocks independent).
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn

from .calibration import batches


def find_blocks(model: nn.Module, layers: list[str]) -> dict[str, list[str]]:
    """{block name: the quantized layers inside it}, in model order; layers outside any ModuleList are left out."""
    out: dict[str, list[str]] = {}
    for name in layers:
        parts = name.split(".")
        for i in range(1, len(parts) - 1):
            if isinstance(model.get_submodule(".".join(parts[:i])), nn.ModuleList):
                out.setdefault(".".join(parts[:i + 1]), []).append(name)
                break
    return out


def _first_tensor(out):
    return out if isinstance(out, torch.Tensor) else next(o for o in out if isinstance(o, torch.Tensor))


class BlockData:
    """The recorded (args, kwargs) of one block's calls and its full-precision outputs, concatenated over the
    calibration batches along dim 0 (tensors whose first dim is the batch; others are taken from the first call)."""

    def __init__(self, calls: list[tuple]):
        n = [_first_tensor(out).shape[0] for _, _, out in calls]
        args0, kwargs0, _ = calls[0]

        def cat(values, first):
            if isinstance(first, torch.Tensor) and first.dim() and first.shape[0] == n[0]:
                return torch.cat(values), True
            return first, False

        self.args = [cat([c[0][i] for c in calls], a) for i, a in enumerate(args0)]
        self.kwargs = {k: cat([c[1][k] for c in calls], v) for k, v in kwargs0.items()}
        self.target = torch.cat([_first_tensor(c[2]) for c in calls])
        self.rows = self.target.shape[0]

    def select(self, idx: torch.Tensor) -> tuple[list, dict, torch.Tensor]:
        args = [a[idx] if batched else a for a, batched in self.args]
        kwargs = {k: (v[idx] if batched else v) for k, (v, batched) in self.kwargs.items()}
        return args, kwargs, self.target[idx]


def capture(model: nn.Module, names: list[str], inputs: dict, batch_size: int = 128) -> dict[str, BlockData]:
    """Run the (full-precision) model over the calibration inputs, recording every named block's calls."""
    calls: dict[str, list] = {n: [] for n in names}
    handles = []
    for name in names:
        block = model.get_submodule(name)

        def hook(module, args, kwargs, out, name=name):
            detach = lambda v: v.detach() if isinstance(v, torch.Tensor) else v  # noqa: E731
            calls[name].append(([detach(a) for a in args], {k: detach(v) for k, v in kwargs.items()},
                                detach(out) if isinstance(out, torch.Tensor) else tuple(detach(o) for o in out)))

        handles.append(block.register_forward_hook(hook, with_kwargs=True))
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for batch in batches(inputs, batch_size):
                batch = {k: v.to(device) for k, v in batch.items()}
                x, t = batch.pop("x"), batch.pop("t")
                model(x, t, **batch)
    finally:
        for h in handles:
            h.remove()
    return {n: BlockData(c) for n, c in calls.items()}


def block_error(block: nn.Module, data: BlockData, batch_size: int = 256) -> float:
    """‖f(X; Ŵ) − f(X; W)‖² / ‖f(X; W)‖² over all recorded rows."""
    err, ref = 0.0, 0.0
    with torch.no_grad():
        for b in range(0, data.rows, batch_size):
            args, kwargs, target = data.select(torch.arange(b, min(b + batch_size, data.rows)))
            out = _first_tensor(block(*args, **kwargs))
            err += float(((out - target) ** 2).sum())
            ref += float((target ** 2).sum())
    return err / max(ref, 1e-30)


def reconstruct(block: nn.Module, data: BlockData, params: list[torch.Tensor], steps: int, lr: float,
                regulariser: Callable[[int], torch.Tensor], rows_per_step: int = 64, seed: int = 0) -> None:
    """Adam on `params` for `steps` steps: relative output MSE of the block on a random minibatch of recorded rows
    plus regulariser(step)."""
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params, lr=lr)
    mine = {id(p) for p in params}
    frozen = [p for p in block.parameters() if p.requires_grad and id(p) not in mine]
    for p in frozen:  # no gradient for the rest of the block (adaLN, norms): only `params` are learned
        p.requires_grad_(False)
    try:
        for step in range(steps):
            idx = torch.randperm(data.rows, generator=g)[:rows_per_step]
            args, kwargs, target = data.select(idx)
            out = _first_tensor(block(*args, **kwargs))
            loss = ((out - target) ** 2).sum() / (target ** 2).sum().clamp_min(1e-30) + regulariser(step)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        for p in frozen:
            p.requires_grad_(True)
