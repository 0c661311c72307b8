"""FORA (Selvaraju et al. 2024, "Fast-Forward Caching in Diffusion Transformer Acceleration").

Static caching: every `interval` model evaluations (evaluation 0, N, 2N, ...) run in full and store the
output of every block's attention and MLP (before the block's adaLN gate); the evaluations in between
reuse those outputs, so a block only computes its adaLN modulation, norms and gated residual additions.
With S evaluations that is exactly ceil(S / N) full passes. As in the official DiT code
(`boost_infer_static`, prathebaselva/FORA) the gates are recomputed every step from the current timestep;
the official loop counts steps down and also recomputes at its first step, which is the same schedule
whenever (S - 1) is a multiple of N.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from ..registry import CACHE_POLICIES
from .adapters import patch_target, sub_module_units
from .base import CachePolicy


@dataclass
class FORAConfig:
    interval: int = 3  # N: one full evaluation every N (FORA's --cache-threshold; the paper's DiT setting is 3)


class FORA(CachePolicy):
    name = "fora"

    def __init__(self, cfg: FORAConfig):
        super().__init__(cfg)
        if cfg.interval < 1:
            raise ConfigError(f"fora interval must be >= 1, got {cfg.interval}: use 1 (no caching) or more")

    def units(self, model):
        return sub_module_units(model)

    def init_state(self, session):
        return {"outputs": {}}

    def install(self, session, units):
        for name, module in units:
            owner, attr = patch_target(module)
            session.patch(owner, self._forward(session, name, module.forward), attr)

    def _forward(self, session, name, original):
        interval = self.cfg.interval

        def forward(*args, **kwargs):
            cache = session.state["outputs"]
            if session.step % interval == 0:
                out = cache[name] = original(*args, **kwargs)
                session.mark(name, False)
                return out
            session.mark(name, True)
            return cache[name]

        return forward


@CACHE_POLICIES.register("fora", config=FORAConfig, help="FORA: full pass every N steps, reuse attention/MLP outputs in between")
def build_fora(cfg: FORAConfig) -> FORA:
    return FORA(cfg)
