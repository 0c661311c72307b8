"""TaylorSeer (Liu et al. 2025, "From Reusing to Forecasting: Accelerating Diffusion Models with TaylorSeers").

Forecast instead of reuse. At a full evaluation every hooked module (each block's attention and MLP, as in
TaylorSeer-DiT) stores its output F and finite differences up to order m, each divided by the gap between
the last two full evaluations:

    D_0 = F(i),   D_{k+1} = (D_k(i) - D_k(i_prev)) / (i - i_prev)

At an evaluation i' in between, with d = i' - i (i the last full evaluation), it predicts

    F(i') ~ sum_k D_k d^k / k!

Schedule (the official `cal_type`): the first `first_enhance` evaluations are full, then one full evaluation
every `interval` (1 full + interval-1 forecast). Differences are formed only from evaluation
`first_enhance - 1` on; before that the cache keeps order 0 only. DiT defaults from the paper / TaylorSeer-DiT:
interval 4, max_order 4, first_enhance 2.

`estimator=newton` (a ditk option, not in the paper) divides the k-th difference by the span of the k+1 full
evaluations it covers and evaluates the Newton interpolation polynomial through them: identical to the
paper at order 1, and exact for outputs that are polynomials of degree <= max_order in the step index. The
paper's estimator treats backward differences as derivatives at the newest point, which is off by O(gap)
per order (a quadratic is not forecast exactly at order 2), but damps high orders strongly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError
from ..registry import CACHE_POLICIES
from .adapters import patch_target, sub_module_units
from .base import CachePolicy

ESTIMATORS = ("taylorseer", "newton")


@dataclass
class TaylorSeerConfig:
    interval: int = 4  # one full evaluation every `interval` (TaylorSeer-DiT: --interval 4)
    max_order: int = 4  # highest finite-difference order (TaylorSeer-DiT: --max-order 4)
    first_enhance: int = 2  # the first evaluations that always run in full (TaylorSeer-DiT: 2)
    estimator: str = "taylorseer"  # taylorseer (the paper's) | newton (exact on polynomials)


class TaylorSeer(CachePolicy):
    name = "taylorseer"

    def __init__(self, cfg: TaylorSeerConfig):
        super().__init__(cfg)
        if cfg.interval < 1 or cfg.max_order < 0 or cfg.first_enhance < 1:
            raise ConfigError("taylorseer needs interval >= 1, max_order >= 0 and first_enhance >= 1")
        if cfg.estimator not in ESTIMATORS:
            raise ConfigError(f"unknown taylorseer estimator '{cfg.estimator}': use one of {', '.join(ESTIMATORS)}")

    def units(self, model):
        return sub_module_units(model)

    def init_state(self, session):
        return {"full": [], "factors": {}}  # full: indices of the full evaluations, newest last

    def install(self, session, units):
        for name, module in units:
            owner, attr = patch_target(module)
            session.patch(owner, self._forward(session, name, module.forward), attr)

    def begin_eval(self, session):
        i, full = session.step, session.state["full"]
        if i < self.cfg.first_enhance or i - full[-1] >= self.cfg.interval:
            full.append(i)

    def _forward(self, session, name, original):
        cfg = self.cfg
        newton = cfg.estimator == "newton"

        def forward(*args, **kwargs):
            i, full, factors = session.step, session.state["full"], session.state["factors"]
            if full[-1] == i:  # a full evaluation: compute, then refresh the differences
                out = original(*args, **kwargs)
                new, nodes = [out], [i]
                if name in factors and i >= cfg.first_enhance - 1:
                    old, old_nodes = factors[name]  # old_nodes: the full evaluations behind `old`, newest first
                    for k in range(min(cfg.max_order, len(old))):
                        gap = i - (old_nodes[k] if newton else old_nodes[0])
                        new.append((new[k] - old[k]) / gap)
                    nodes += old_nodes[: len(new) - 1]
                factors[name] = (new, nodes)
                session.mark(name, False)
                return out
            session.mark(name, True)
            terms, nodes = factors[name]
            if newton:  # Newton form: sum_k D_k prod_{j<k} (i - x_j)
                out, weight = terms[0], 1.0
                for k in range(1, len(terms)):
                    weight *= i - nodes[k - 1]
                    out = out + terms[k] * weight
                return out
            d = i - nodes[0]
            out = terms[0]
            for k in range(1, len(terms)):
                out = out + terms[k] * (d**k / math.factorial(k))
            return out

        return forward


@CACHE_POLICIES.register("taylorseer", config=TaylorSeerConfig,
                         help="TaylorSeer: forecast attention/MLP outputs with finite-difference Taylor series")
def build_taylorseer(cfg: TaylorSeerConfig) -> TaylorSeer:
    return TaylorSeer(cfg)
