"""Next-token cross-entropy: the objective of the autoregressive captioning baseline (`caption-ar`).

Not a diffusion: no time, no noise (`uses_noise = False`), and no diffusers solver; captions are sampled token by
token by `ditk.caption.generate`. It exists so that the baseline trains through the same loop, data order,
checkpoints and resume as the diffusion captioner it is compared with.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import ConfigError
from ..registry import OBJECTIVES
from .base import Objective, cfg_get


@dataclass
class NextTokenConfig:
    temperature: float = 1.0  # sampling temperature of `ditk sample` (0 = greedy)


@OBJECTIVES.register("next-token", config=NextTokenConfig, help="next-token cross-entropy (autoregressive baseline)")
class NextToken(Objective):
    name = "next-token"
    solvers = ("autoregressive",)
    uses_noise = False

    def __init__(self, cfg=None):
        self.temperature = float(cfg_get(cfg, "temperature", 1.0)) if cfg is not None else 1.0

    @property
    def learn_sigma(self) -> bool:
        return False

    def sample_time(self, n: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
        return torch.zeros(n, dtype=torch.long)

    def model_time(self, t: torch.Tensor) -> torch.Tensor:
        return t.float()

    def scheduler_timestep_to_model_time(self, timestep) -> torch.Tensor:
        return torch.as_tensor(timestep).float()

    def _make_scheduler(self, solver, steps, device, options):
        # `solvers` names "autoregressive" so that `ditk sample` accepts the run; its decoding is token by token in
        # ditk.caption.generate and never goes through the diffusion sampling loop.
        raise ConfigError(f"solver '{solver}': an autoregressive captioner decodes token by token, not with a "
                          "diffusion solver: sample it with `ditk sample RUN --images ...`")

    def training_losses(self, model, x0, t, noise, model_kwargs=None) -> dict:
        """x0: token ids (N, L). Mean cross-entropy of ids[:, 1:] given the prefix and ids[:, :-1] (padding too:
        the diffusion captioner models the whole fixed-length sequence as well)."""
        ids = x0.long()
        logits = model(ids[:, :-1], t, **(model_kwargs or {}))
        targets = getattr(model, "module", model).targets(ids[:, 1:])
        nll = F.cross_entropy(logits.transpose(1, 2), targets, reduction="none").mean(dim=-1)
        return {"loss": nll, "nll": nll}
