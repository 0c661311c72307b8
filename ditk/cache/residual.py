"""Dynamic residual caching: FirstBlockCache and TeaCache reuse the residual of the block stack when a cheap
signal says the input has barely changed.

FirstBlockCache (ParaAttention / diffusers `FirstBlockCacheConfig`): run block 0; compare its residual
(output - input) with the residual it had at the last evaluation that ran the remaining blocks; if the
relative L1 change, mean|r - r_prev| / mean|r_prev|, is below `threshold`, skip blocks 1..L-1 and add their
cached residual (last block's output - block 0's output at that evaluation) instead. diffusers' default
threshold is 0.05; diffusers also reuses at a change exactly equal to the threshold, ditk does not, so that
threshold 0 never skips (reusing a residual is exact only up to rounding, even for an unchanged input).

TeaCache (Liu et al. 2025, "Timestep Embedding Tells: It's Time to Cache for Video Diffusion Model";
ali-vilab/TeaCache): the signal is the timestep-modulated input of block 0 (for DiT the input its attention
sees, see `adapters`), compared with the previous evaluation's; the relative L1 change is rescaled by a
polynomial fitted per model (coefficients highest degree first, as np.poly1d) and accumulated; while the
accumulated distance stays below `threshold` the whole stack is skipped and its cached residual (last
block's output - block 0's input) is added; otherwise the stack runs and the accumulator restarts. The first
and the last evaluation always run. `ditk sample --cache teacache --calibrate` fits the polynomial for a run
(stored as runs/<name>/teacache.json, used from then on); uncalibrated, the rescaling is the identity.
ditk clamps the rescaled value at 0: a fitted polynomial can dip below zero outside its data, and a negative
distance would let the accumulator run backwards.

Both decide per batch row (each image's conditional and unconditional pass separately, see `base`), and
only the rows that must be recomputed go through the skipped blocks. "Output", "input" and "residual" are block
*states* (`adapters`): one tensor for DiT-like blocks, [hidden | residual] for Mamba blocks, the joint
[text; music] sequence for FluxMusic's double- and single-stream blocks alike, so a skipped span is the identity
on the state even where the model reshapes its streams between blocks. FirstBlockCache's signal for Mamba
blocks is the model state hidden + residual.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import numpy as np
import torch

from ..errors import ConfigError
from ..registry import CACHE_POLICIES
from .adapters import BlockIO, modulated_input
from .base import CachePolicy, masked_forward, model_blocks, relative_l1


def _rows(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.view(-1, *([1] * (like.dim() - 1)))


class ResidualCache(CachePolicy):
    """Shared skeleton: the head decides a per-row compute mask; the span from `span_start` to the last block
    then runs on the rows in the mask only, and the last block adds the cached residual (last output state -
    span input state, see `adapters` for block states) to the rows outside it."""

    span_start = 1  # FirstBlockCache always runs block 0; TeaCache's span is the whole stack

    def units(self, model):
        return [(f"blocks.{i}", block) for i, block in enumerate(model_blocks(model))]

    def init_state(self, session):
        return {"resid": None}

    def install(self, session, units):
        last = len(units) - 1
        for j, (name, block) in enumerate(units):
            session.patch(block, self._forward(session, j, last, name, BlockIO(block), block.forward))

    def _set_mask(self, st: dict, mask: torch.Tensor) -> None:
        st["mask"] = mask
        st["all"] = bool(mask.all())  # one device sync per evaluation
        st["none"] = not st["all"] and not bool(mask.any())

    def _forward(self, session, j, last, name, io, original):
        def forward(*args, **kwargs):
            st = session.state
            if j == 0:
                out = self.head(session, io, original, args, kwargs)
                if self.span_start == 1:  # block 0 ran on every row (it is never the last block)
                    session.mark(name, False)
                    return out
            if j == self.span_start:
                st["base"] = io.read_in(args, kwargs)  # the span's input state (for the computed rows)
            if j != last:
                session.mark(name, False if st["all"] else ~st["mask"])
                if session.step == 0:  # every row runs; refuse, once, a block whose states it cannot add up
                    out = original(*args, **kwargs)
                    io.read_out(out, args, kwargs)
                    return out
                return masked_forward(io, original, st, args, kwargs)
            # The last block: computed rows give their output state, skipped rows (whose state passed through
            # the span unchanged) add the cached residual; the residual of the computed rows is refreshed.
            if st["all"]:
                out = original(*args, **kwargs)
                state = io.read_out(out, args, kwargs)
            else:
                state = io.read_in(args, kwargs) + st["resid"]
                if not st["none"]:
                    sub_args, sub_kwargs = io.select(args, kwargs, st["mask"])
                    state[st["mask"]] = io.read_out(original(*sub_args, **sub_kwargs), sub_args, sub_kwargs)
                out = io.write(state, args, kwargs)
            session.mark(name, False if st["all"] else ~st["mask"])
            if not st["none"]:
                fresh = state - st["base"]
                st["resid"] = fresh if st["all"] else torch.where(_rows(st["mask"], fresh), fresh, st["resid"])
            return out

        return forward


@dataclass
class FBCConfig:
    threshold: float = 0.05  # reuse while block 0's residual changed by less than this (relative L1); 0: never


class FirstBlockCache(ResidualCache):
    name = "fbc"

    def __init__(self, cfg: FBCConfig):
        super().__init__(cfg)
        if cfg.threshold < 0:
            raise ConfigError(f"fbc threshold must be >= 0, got {cfg.threshold}")

    def validate(self, model, num_evals):
        if len(model_blocks(model)) < 2:
            raise ConfigError("fbc needs a model with at least 2 blocks (block 0 is always computed)")

    def head(self, session, io, original, args, kwargs):
        st = session.state
        out = original(*args, **kwargs)
        resid = io.signal(io.read_out(out, args, kwargs)) - io.signal(io.read_in(args, kwargs))
        prev = st.get("head_resid")
        if prev is None:
            mask = torch.ones(resid.shape[0], dtype=torch.bool, device=resid.device)
        else:
            mask = ~(relative_l1(resid, prev) < self.cfg.threshold)  # NaN / inf: recompute
        st["head_resid"] = resid if prev is None else torch.where(_rows(mask, resid), resid, prev)
        self._set_mask(st, mask)
        return out


@dataclass
class TeaCacheConfig:
    threshold: float = 0.25  # rel_l1_thresh: skip while the accumulated distance stays below (TeaCache4FLUX: 0.25 ~ 1.5x)
    coefficients: Optional[List[float]] = None  # rescaling polynomial, highest degree first (None: identity)


def polynomial(coefficients, x: torch.Tensor) -> torch.Tensor:
    """np.poly1d(coefficients)(x) by Horner's rule, on a tensor."""
    out = torch.zeros_like(x)
    for c in coefficients:
        out = out * x + float(c)
    return out


class TeaCache(ResidualCache):
    name = "teacache"
    span_start = 0

    def __init__(self, cfg: TeaCacheConfig, record: bool = False):
        super().__init__(cfg)
        if cfg.threshold < 0:
            raise ConfigError(f"teacache threshold must be >= 0, got {cfg.threshold}")
        if cfg.coefficients is not None and len(cfg.coefficients) == 0:
            raise ConfigError("teacache coefficients must list at least one number (highest degree first)")
        self.record = record  # calibration: compute everything, collect (input change, output change) pairs
        self.pairs: list[tuple[np.ndarray, np.ndarray]] = []

    @property
    def coefficients(self) -> list[float]:
        return [1.0, 0.0] if self.cfg.coefficients is None else [float(c) for c in self.cfg.coefficients]

    def settings(self):
        out = super().settings()
        out["options"]["coefficients"] = self.coefficients
        return out

    def validate(self, model, num_evals):
        blocks = model_blocks(model)
        if blocks and modulated_input(blocks[0]) is None:
            raise ConfigError(
                f"teacache does not know the timestep-modulated input of {type(blocks[0]).__name__}: use another policy "
                f"(fbc, fora, taylorseer), or register one with ditk.cache.adapters.register_block"
            )

    def head(self, session, io, original, args, kwargs):
        st = session.state
        block = io.block
        mod = modulated_input(block)(block, args, kwargs)
        prev = st.get("prev_mod")
        i = session.step
        n = mod.shape[0]
        if prev is None or i == 0 or i == session.num_evals - 1 or self.record:
            mask = torch.ones(n, dtype=torch.bool, device=mod.device)
            st["acc"] = torch.zeros(n, dtype=torch.float32, device=mod.device)
            if prev is not None and self.record:
                st["rel_in"] = relative_l1(mod, prev)
        else:
            rel = relative_l1(mod, prev)
            scaled = torch.where(torch.isfinite(rel), polynomial(self.coefficients, rel), torch.full_like(rel, float("inf")))
            acc = st["acc"] + scaled.clamp_min(0)
            mask = acc >= self.cfg.threshold
            st["acc"] = torch.where(mask, torch.zeros_like(acc), acc)
        st["prev_mod"] = mod
        self._set_mask(st, mask)

    def end_eval(self, session, output):
        if not self.record:
            return
        st = session.state
        out = output[:, : session.model.in_channels] if hasattr(session.model, "in_channels") else output
        prev = st.get("prev_out")
        if prev is not None and "rel_in" in st:
            self.pairs.append((st.pop("rel_in").cpu().numpy(), relative_l1(out, prev).cpu().numpy()))
        st["prev_out"] = out

    def fit(self, degree: int = 4) -> list[float]:
        """Least-squares polynomial (np.polyfit) from the modulated-input change to the model-output change."""
        if not self.pairs:
            raise ConfigError("teacache calibration recorded nothing: it needs at least 2 sampling steps")
        x = np.concatenate([p[0] for p in self.pairs]).astype(np.float64)
        y = np.concatenate([p[1] for p in self.pairs]).astype(np.float64)
        keep = np.isfinite(x) & np.isfinite(y)
        x, y = x[keep], y[keep]
        if len(x) <= degree:
            raise ConfigError(f"teacache calibration has {len(x)} points for a degree-{degree} fit: sample more steps or images")
        return np.polyfit(x, y, degree).tolist()


@CACHE_POLICIES.register("fbc", config=FBCConfig,
                         help="FirstBlockCache: skip blocks 1..L-1 while block 0's residual barely changes")
def build_fbc(cfg: FBCConfig) -> FirstBlockCache:
    return FirstBlockCache(cfg)


@CACHE_POLICIES.register("teacache", config=TeaCacheConfig,
                         help="TeaCache: skip the block stack while the rescaled modulated-input change stays small")
def build_teacache(cfg: TeaCacheConfig) -> TeaCache:
    return TeaCache(cfg)
