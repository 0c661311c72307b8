"""An embedded guidance scale: the student of LCM-style distillation takes the CFG scale w as an input.

LCM (Luo et al. 2023, §4.2 "one-stage guided distillation"; diffusers `train_lcm_distill_sd_wds.py`) distils the
teacher's guided ODE for w drawn from a range and gives the student w as a condition: a sinusoidal embedding of w
(LCM's `guidance_scale_embedding`, w x 1000, 10000^(-k/(d/2-1)) frequencies, [sin, cos]) enters the timestep
embedding. The student then samples "with guidance w" in ONE forward pass per step: no [cond; uncond] batch.

Here the embedding is generic over every backbone whose conditioning vector comes from a `t_embedder`
(DiT, DiT-MoE, DyDiT, DiS, Dimba, ...): `add_guidance_embedding(model)` adds a w_embedder (sinusoid ->
Linear-SiLU-Linear, as DiT's TimestepEmbedder) whose output is added to `t_embedder`'s, through hooks: a forward
pre-hook on the model takes the keyword argument `w` (N,) out of the call, and a forward hook on `t_embedder` adds
w_embedder(w). The last Linear is zero-initialised (our choice; LCM's cond_proj is not), so a
student initialised from its teacher computes exactly the teacher's function until it is trained.

The embedder is `t_embedder.w_embedder` (state-dict keys t_embedder.w_embedder.*). A run records it as `model.guidance_embed: true` (a key every model section accepts), so `build_model` rebuilds it
from config.yaml; `ditk.sampling.sample` then passes cfg_scale as `w` instead of doubling the batch.
"""

from __future__ import annotations

import math
import types

import torch
import torch.nn as nn

from ..errors import ConfigError

PREFIX = "t_embedder.w_embedder."


def guidance_scale_embedding(w: torch.Tensor, dim: int = 256) -> torch.Tensor:
    """LCM's sinusoidal embedding of guidance scales w (N,) -> (N, dim) (diffusers
    LatentConsistencyModelPipeline.get_guidance_scale_embedding), in float32."""
    w = w.float() * 1000.0
    half = dim // 2
    freqs = torch.exp(torch.arange(half, dtype=torch.float32, device=w.device) * -(math.log(10000.0) / (half - 1)))
    emb = w[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(emb), torch.cos(emb)], dim=1)
    return nn.functional.pad(emb, (0, 1)) if dim % 2 else emb


class GuidanceEmbedder(nn.Module):
    """w (N,) -> (N, D): LCM's sinusoid, then Linear-SiLU-Linear with the last layer zero (adds exactly 0 at init)."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.mlp = nn.Sequential(nn.Linear(frequency_embedding_size, hidden_size), nn.SiLU(),
                                 nn.Linear(hidden_size, hidden_size))
        nn.init.normal_(self.mlp[0].weight, std=0.02)  # DiT's timestep-MLP init
        nn.init.zeros_(self.mlp[0].bias)
        nn.init.zeros_(self.mlp[2].weight)
        nn.init.zeros_(self.mlp[2].bias)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        return self.mlp(guidance_scale_embedding(w, self.frequency_embedding_size).to(self.mlp[0].weight.dtype))


# The hooks keep no state of their own (w rides on the t_embedder module), so a deepcopy of the model (the EMA)
# works on its own weights.
def _take_w(model, args, kwargs):
    w = kwargs.pop("w", None)
    if w is None:
        raise ConfigError(f"this {type(model).__name__} embeds the guidance scale: call it with w=(N,) scales "
                          f"(ditk sample passes --cfg-scale)")
    model.t_embedder.guidance_w = w
    return args, kwargs


def _add_w(t_embedder, args, output):
    w = getattr(t_embedder, "guidance_w", None)
    if w is None:
        raise ConfigError("the guidance-embedding t_embedder was called outside a model forward with w")
    w = w.to(output.device).reshape(-1)
    if len(w) == 1 and len(output) != 1:
        w = w.expand(len(output))
    return output + t_embedder.w_embedder(w).to(output.dtype)


def _clear_w(model, args, kwargs, output):
    model.t_embedder.guidance_w = None
    return output


def _convert_state_dict(model, sd):
    """Initial weights from a run without the embedding (the teacher): its keys are filled from this model's own
    (zero-output) initialisation, so a student starts as its teacher (ditk.models.convert.load_initial_weights)."""
    convert = model.__dict__.get("_convert_without_guidance")  # the family's own conversion (DyDiT's routers)
    sd = convert(sd) if convert is not None else dict(sd)
    if not any(k.startswith(PREFIX) for k in sd):
        own = model.t_embedder.w_embedder.state_dict()
        sd = {**sd, **{PREFIX + k: v.detach().clone() for k, v in own.items()}}
    return sd


def add_guidance_embedding(model: nn.Module) -> nn.Module:
    """Give `model` a guidance-scale input `w` (see the module docstring); returns the model."""
    t_embedder = getattr(model, "t_embedder", None)
    mlp = getattr(t_embedder, "mlp", None)
    if not isinstance(mlp, nn.Sequential) or not isinstance(mlp[-1], nn.Linear):
        raise ConfigError(f"model.guidance_embed needs a model whose conditioning comes from a timestep MLP "
                          f"(t_embedder), which {type(model).__name__} lacks: drop model.guidance_embed")
    t_embedder.w_embedder = GuidanceEmbedder(mlp[-1].out_features)
    t_embedder.guidance_w = None
    model.register_forward_pre_hook(_take_w, with_kwargs=True)
    t_embedder.register_forward_hook(_add_w)
    model.register_forward_hook(_clear_w, with_kwargs=True)
    if hasattr(model, "convert_state_dict"):  # a bound method (rebound by deepcopy) or a static function
        model._convert_without_guidance = model.convert_state_dict
    model.convert_state_dict = types.MethodType(_convert_state_dict, model)
    return model
