"""DyDiT: DiT with timestep-wise dynamic width and spatial-wise dynamic tokens (Zhao et al., "Dynamic Diffusion
Transformer", ICLR 2025). Followed: the official code, NUS-HPC-AI-Lab/Dynamic-Diffusion-Transformer (`models.py`,
`dynamic_model.py`) and its later training release (`train.py`, `loss.py`, `diffusion/gaussian_diffusion.py`,
`train0.5.sh`; read from the public mirror kawgit/DyDiT), where it differs from the paper's prose:

- Spatial-wise Dynamic Token (SDT), per block: a token router (official `TokenSelect`), the MLP
  Linear(D, D/16) -> ReLU -> Linear(D/16, 1), on every token of the residual stream *after* the attention update
  (the input of the MLP branch), one logit per token. Tokens it drops bypass the MLP (identity); attention always
  sees every token.
- Timestep-wise Dynamic Width (TDW, `dynamic_width`), per block: two routers Linear(D, H - 1) on the timestep
  embedding (the t_embedder output, before the label is added) choose the attention heads and the H groups of
  mlp_ratio*D/H MLP hidden channels that run; the first head / group is always on (the official later release,
  `Router(channel_number=num_heads - 1)` with a column of ones prepended). Heads are masked on the attention output
  before `proj`, channel groups on the fc1 output, as officially. In sampling, every row of a batch shares its
  timestep, so whole heads and channel groups are simply not computed.
- Gates (official `_gumbel_sigmoid(hard=True)`): in training a hard gate with a straight-through gradient from a
  Gumbel-sigmoid with temperature tau = 5: soft = sigmoid((logit + g1 - g2) / tau), g1, g2 ~ Gumbel(0, 1);
  hard = [soft > 0.5]; gate = hard - sg(soft) + soft; all tokens / heads / channels are computed and multiplied by
  the gates. In eval: [sigmoid(logit) > 0.5], and the work of everything off is skipped for real: kept tokens are
  gathered, normalised, modulated, sent through the (channel-sliced) MLP and scattered back (added to the
  residual); attention runs on the active heads' slices of qkv / proj.
- Initialisation (official `initialize_weights`): routers get DiT's xavier init, then last biases 35 (tokens) and
  15 (heads, channel groups): everything is on at first, so a dense DiT loaded into the model is reproduced exactly.
- FLOPs loss (official `loss.py`): w * (mean_n r_n - target)^2 with w = 2 and, per sample n,
  r_n = sum_l (A * heads_l,n / H + M * groups_l,n / H * kept_l,n / T) / sum_l (A + M), A and M the multiply-adds
  of a block's attention (qkv, q k^T, a v, proj) and MLP: the budget lambda constrains the blocks'
  attention+MLP compute (routers, adaLN, embedders and head are outside it, as officially).
- Budget schedule (official `train.py --warmup`): target = 1 - (1 - lambda) * min(step / budget_warmup, 1), and
  1.0 during the first `budget_hold` = 100 steps. The model counts its own training forward passes for `step` (a
  buffer saved with the weights, so a resumed run continues the schedule); with train.grad_accum_steps = k one
  optimiser step is k passes.

Left out: the official stage-1 "complete model" loss (the diffusion loss of the all-on model added to the
dynamic one, `training_losses` in their gaussian_diffusion.py) and the stratified timestep sampling
(`--t_sample`): both belong to the training loop / objective, not the model. The official stage 2
(`train_without_completemodel.py`) trains exactly what is here.

Hook points: every attention keeps q/k/v/out hooks. With dynamic width in eval, q_hook/k_hook/v_hook see only the
active heads (N, active, T, head_dim) of a batch group, and out_hook the full-width output with zeros in the
channels of the heads that are off.

Feature caches (ditk.cache): a policy that caches `blocks.i.mlp` wraps the MLP's forward; the block then runs the
MLP through the wrapper on every token (masked afterwards, the official inference form) so the cached tensors keep
their shape. The FLOPs report counts what the model itself skipped; units a cache skips are counted as computed
(the cache's own report in report.json says how many it skipped); whole blocks a cache skips cost nothing.

Randomness: the Gumbel noise comes from a generator seeded by the model's training-pass counter (never the
global RNG), so a run and its resumed copy draw the same noise. Under DDP every process draws noise for its own
micro-batch, so N processes and 1 process give statistically equal, not bit-identical, gates.

FLOPs: `flops()` counts the FLOPs (2 x multiply-adds, the convention of torch.utils.flop_counter) of one eval
forward analytically: patch embedding, timestep MLP, every adaLN, attention on the active heads, routers, the MLP
on the kept tokens and active channels, final layer. Elementwise work (LayerNorm, GELU, SiLU, softmax,
modulation, gating, gather/scatter) and the label lookup are not counted (nor does FlopCounterMode count them).
The paper's "FLOPs" are multiply-adds (DiT-XL/2: 118.6 G, i.e. 237 G here). During sampling the model logs every
eval forward; `sampling_report()` gives the FLOPs spent per sampler step, the total and the fraction of a dense
DiT's FLOPs (ditk sample's report.json, key "model").
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import section_kwargs
from ..errors import ConfigError
from ..registry import MODELS
from .dit import DiT, DiTBlock, DiTConfig
from .layers import Attention, Mlp, modulate

GATE_THRESHOLD = 0.5  # official `threshold`: a token passes when its (noisy, in training) sigmoid exceeds it
NOISE_SEED = 20_241_004  # seeds the Gumbel-noise generator together with the training-pass counter


@dataclass
class DyDiTConfig(DiTConfig):
    token_budget: float = 0.5  # lambda: target fraction of the blocks' attention+MLP FLOPs
    flops_loss_weight: float = 2.0  # official `token_loss_ratio`; 0 switches the FLOPs loss off
    budget_warmup: int = 1000  # steps over which the target goes 1 -> lambda (official train.py default)
    budget_hold: int = 100  # first steps with target 1.0 (official train.py)
    router_hidden_ratio: int = 16  # token router hidden width = hidden_size // this (official D/16)
    router_bias_init: float = 35.0  # last token-router bias at init (official 35: every token passes)
    dynamic_width: bool = True  # TDW: timestep routers over attention heads and MLP channel groups (official: on)
    width_router_bias_init: float = 15.0  # head / channel-group router bias at init (official 15: all on)
    gate_tau: float = 5.0  # Gumbel-sigmoid temperature (official 5); only scales the straight-through gradient
    gumbel_noise: bool = True  # official: noisy gates in training; false = deterministic hard threshold


#################################################################################
#                                 Routers, gates                                #
#################################################################################


class TokenRouter(nn.Module):
    """tokens (N, T, D) -> logits (N, T): Linear(D, D/r) -> ReLU -> Linear(D/r, 1) (official `TokenSelect.mlp_head`)."""

    def __init__(self, hidden_size: int, hidden_ratio: int = 16):
        super().__init__()
        self.hidden = max(1, hidden_size // hidden_ratio)
        self.mlp_head = nn.Sequential(nn.Linear(hidden_size, self.hidden), nn.ReLU(), nn.Linear(self.hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mlp_head(x).squeeze(-1)


class WidthRouter(nn.Module):
    """timestep embedding (N, D) -> logits (N, H - 1) for heads (or MLP channel groups) 1..H-1; group 0 is always on
    (official `Router`, a Linear named `router`)."""

    def __init__(self, hidden_size: int, groups: int):
        super().__init__()
        self.groups = groups
        self.router = nn.Linear(hidden_size, groups - 1)

    def forward(self, t_emb: torch.Tensor) -> torch.Tensor:
        return self.router(t_emb)


def logistic_noise(shape, generator: torch.Generator) -> torch.Tensor:
    """g1 - g2 with g1, g2 ~ Gumbel(0, 1) (a standard logistic variable), drawn as the official code does:
    g = -log(E), E ~ Exp(1)."""
    e1 = torch.empty(shape).exponential_(generator=generator)
    e2 = torch.empty(shape).exponential_(generator=generator)
    return torch.log(e2) - torch.log(e1)


def straight_through_gate(logits: torch.Tensor, tau: float, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Hard 0/1 gate in the forward pass, d gate / d logit = d sigmoid((logit + noise) / tau) in the backward pass
    (official `_gumbel_sigmoid(hard=True)`)."""
    z = logits if noise is None else logits + noise
    soft = torch.sigmoid(z / tau)
    hard = (soft > GATE_THRESHOLD).to(soft.dtype)
    return hard - soft.detach() + soft


def channel_index(groups_on: torch.Tensor, group_size: int) -> torch.Tensor:
    """(G,) bool groups -> the indices of their channels (group g owns channels g*size .. (g+1)*size - 1)."""
    on = groups_on.nonzero(as_tuple=True)[0]
    return (on[:, None] * group_size + torch.arange(group_size, device=on.device)).reshape(-1)


#################################################################################
#                            Dynamic-width attention, MLP                       #
#################################################################################


class DynamicWidthAttention(Attention):
    """ditk's Attention (same qkv/proj names, same hook points) that can run a subset of its heads."""

    def forward(self, x: torch.Tensor, head_gate: Optional[torch.Tensor] = None) -> torch.Tensor:
        """head_gate None: all heads. (N, H) float: every head computed, its output multiplied by the gate before
        `proj` (training; official). (N, H) bool: only the active heads are computed (eval)."""
        if head_gate is None:
            return super().forward(x)
        if head_gate.dtype == torch.bool:
            return self.active_heads(x, head_gate)
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k, v = self.q_hook(q), self.k_hook(k), self.v_hook(v)
        o = F.scaled_dot_product_attention(q, k, v) * head_gate[:, :, None, None].to(q.dtype)
        return self.proj(self.out_hook(o.transpose(1, 2).reshape(n, t, d)))

    def active_heads(self, x: torch.Tensor, heads_on: torch.Tensor) -> torch.Tensor:
        if bool(heads_on.all()):
            return super().forward(x)
        patterns, group = torch.unique(heads_on, dim=0, return_inverse=True)
        if len(patterns) == 1:
            return self.head_slice(x, patterns[0])
        out = x.new_empty(x.shape)
        for g, pattern in enumerate(patterns):
            rows = (group == g).nonzero(as_tuple=True)[0]
            out[rows] = self.head_slice(x[rows], pattern)
        return out

    def head_slice(self, x: torch.Tensor, pattern: torch.Tensor) -> torch.Tensor:
        """Attention with the heads of `pattern` (H,) bool only: their rows of qkv, their columns of proj."""
        n, t, d = x.shape
        idx = channel_index(pattern, self.head_dim)
        heads = int(pattern.sum())
        w = self.qkv.weight.view(3, d, d)[:, idx].reshape(3 * len(idx), d)
        b = self.qkv.bias.view(3, d)[:, idx].reshape(-1) if self.qkv.bias is not None else None
        q, k, v = F.linear(x, w, b).reshape(n, t, 3, heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k, v = self.q_hook(q), self.k_hook(k), self.v_hook(v)
        o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(n, t, len(idx))
        full = o.new_zeros(n, t, d)
        full[..., idx] = o
        full = self.out_hook(full)  # the hook sees the full width, zeros where heads are off
        return F.linear(full[..., idx], self.proj.weight[:, idx], self.proj.bias)


class DynamicWidthMlp(Mlp):
    """ditk's Mlp (same fc1/fc2 names) whose hidden channels come in H groups that a (N, H) gate can switch off."""

    def forward(self, x: torch.Tensor, group_gate: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x (N, T, D); group_gate None: the plain MLP; (N, H) float or bool: fc1 -> multiply by the gates ->
        GELU -> fc2, every channel computed (training; the official order)."""
        if group_gate is None:
            return super().forward(x)
        h = self.fc1(x)
        size = h.shape[-1] // group_gate.shape[1]
        h = h * group_gate.to(h.dtype).repeat_interleave(size, dim=1)[:, None, :]
        return self.fc2(self.act(h))


def mlp_channel_slice(mlp: Mlp, x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Eval: the MLP restricted to hidden channels idx (rows of fc1, columns of fc2) on x (K, D)."""
    h = mlp.act(F.linear(x, mlp.fc1.weight[idx], mlp.fc1.bias[idx]))
    return F.linear(h, mlp.fc2.weight[:, idx], mlp.fc2.bias)


#################################################################################
#                                     Block                                     #
#################################################################################


class DyDiTBlock(DiTBlock):
    """DiT's adaLN-Zero block (same names, attention with its hook points) plus a token router in front of the MLP
    and, with dynamic width, head and channel-group routers on the timestep embedding (`attn_rate`, `mlp_rate`).

    After a forward: `token_mask` (N, T), `head_mask` and `group_mask` (N, H) (None without dynamic width): float 0/1
    gates in training (detached by DyDiT once its FLOPs loss is built), bool in eval.
    """

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, router_hidden_ratio: int = 16,
                 gate_tau: float = 5.0, dynamic_width: bool = False):
        attn = DynamicWidthAttention(hidden_size, num_heads, qkv_bias=True) if dynamic_width else None
        mlp = DynamicWidthMlp(hidden_size, int(hidden_size * mlp_ratio)) if dynamic_width else None
        super().__init__(hidden_size, num_heads, mlp_ratio=mlp_ratio, attn=attn, mlp=mlp)
        self.token_selection = TokenRouter(hidden_size, router_hidden_ratio)
        self.attn_rate = WidthRouter(hidden_size, num_heads) if dynamic_width else None
        self.mlp_rate = WidthRouter(hidden_size, num_heads) if dynamic_width else None
        self.gate_tau = gate_tau
        self.noise_generator: Optional[torch.Generator] = None  # set by DyDiT for each training pass
        self.timestep_embedding: Optional[torch.Tensor] = None  # set by DyDiT for each pass (dynamic width)
        self.token_mask = self.head_mask = self.group_mask = None
        self.mlp_ran_dense = False  # eval: the MLP ran on every token (its forward is wrapped by a cache / compile)

    def gate(self, logits: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return torch.sigmoid(logits) > GATE_THRESHOLD
        noise = None
        if self.noise_generator is not None:
            noise = logistic_noise(logits.shape, self.noise_generator).to(logits.device, logits.dtype)
        return straight_through_gate(logits, self.gate_tau, noise)

    def width_gate(self, router: WidthRouter) -> torch.Tensor:
        gates = self.gate(router(self.timestep_embedding))
        return torch.cat([torch.ones_like(gates[:, :1]), gates], dim=1)  # group 0 always on

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        heads = groups = None
        if self.attn_rate is not None:
            heads, groups = self.width_gate(self.attn_rate), self.width_gate(self.mlp_rate)
        self.head_mask, self.group_mask = heads, groups
        h = modulate(self.norm1(x), shift_msa, scale_msa)
        x = x + gate_msa.unsqueeze(1) * (self.attn(h) if heads is None else self.attn(h, heads))
        keep = self.gate(self.token_selection(x))  # (N, T), decided on the stream entering the MLP branch
        self.token_mask = keep
        if self.training:
            h = modulate(self.norm2(x), shift_mlp, scale_mlp)
            out = self.mlp(h) if groups is None else self.mlp(h, groups)
            return x + keep.unsqueeze(-1) * (gate_mlp.unsqueeze(1) * out)
        return x + self.mlp_branch(x, keep, shift_mlp, scale_mlp, gate_mlp, groups)

    def mlp_branch(self, x: torch.Tensor, keep: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor,
                   gate: torch.Tensor, groups: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The MLP branch's residual update, gate * MLP(modulate(norm(x))), on the kept tokens (gather -> MLP on the
        active channel groups -> scatter into zeros); skipped tokens get 0. Everything on: DiT's dense expression
        itself (bit-identical). A method of its own so that feature caches (ditk.cache.adapters) reuse the whole
        routed branch, keeping its sparse computation on the steps they compute.

        When something has wrapped the MLP's forward (a feature cache that caches `blocks.i.mlp`, torch.compile), the
        MLP runs through that wrapper on every token with the channel-group gates and its output is multiplied by
        the token mask (the official inference code's form): same values, shapes that do not change per step."""
        all_groups = groups is None or bool(groups.all())
        self.mlp_ran_dense = False
        if all_groups and bool(keep.all()):
            return gate.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift, scale))
        if "forward" in vars(self.mlp):
            self.mlp_ran_dense = True
            h = modulate(self.norm2(x), shift, scale)
            out = self.mlp(h) if all_groups else self.mlp(h, groups)
            return keep.unsqueeze(-1).to(x.dtype) * (gate.unsqueeze(1) * out)
        rows, cols = keep.nonzero(as_tuple=True)
        if rows.numel() == 0:
            return torch.zeros_like(x)
        tokens = self.norm2(x[rows, cols])  # (K, D): LayerNorm is per token, so norming the gathered ones is exact
        h = tokens * (1 + scale[rows]) + shift[rows]
        if all_groups:
            y = self.mlp(h)
        else:
            patterns, group = torch.unique(groups, dim=0, return_inverse=True)
            size = self.mlp.fc1.out_features // groups.shape[1]
            token_group = group[rows]
            y = h.new_empty(h.shape)
            for g, pattern in enumerate(patterns):
                sel = (token_group == g).nonzero(as_tuple=True)[0]
                if sel.numel():
                    y[sel] = mlp_channel_slice(self.mlp, h[sel], channel_index(pattern, size))
        return torch.zeros_like(x).index_put((rows, cols), gate[rows] * y)


#################################################################################
#                                FLOPs accounting                               #
#################################################################################


def dit_flops(rows: int, tokens: int, hidden_size: int, mlp_hidden: int, depth: int, patch_size: int,
              in_channels: int, out_channels: int, frequency_embedding_size: int = 256) -> int:
    """FLOPs (2 x multiply-adds) of a dense DiT forward over `rows` inputs: what FlopCounterMode counts (matmuls
    and the patch convolution; biases, norms, activations and the label lookup are not counted)."""
    d, t = hidden_size, tokens
    embed = 2 * t * d * in_channels * patch_size**2 + 2 * (frequency_embedding_size * d + d * d)
    block = block_flops(t, d, mlp_hidden)
    final = 2 * d * 2 * d + 2 * t * d * patch_size**2 * out_channels
    return rows * (embed + depth * (2 * d * 6 * d + block["attn"] + block["mlp"]) + final)


def block_flops(tokens: int, hidden_size: int, mlp_hidden: int) -> dict:
    """Per-row FLOPs of one block's attention (qkv, q k^T, a v, proj) and MLP over all its tokens."""
    t, d = tokens, hidden_size
    attn = 2 * (t * d * 3 * d + t * d * d) + 2 * 2 * t * t * d
    return {"attn": attn, "mlp": 2 * 2 * t * d * mlp_hidden}


#################################################################################
#                                     Model                                     #
#################################################################################


class DyDiT(DiT):
    """DiT with DyDiT's dynamic tokens (and, with dynamic_width, dynamic heads and MLP channels). Same embedders,
    final layer, initialisation and forward as ditk's DiT; model(x, t, y) -> (N, out_channels, H, W). In training,
    `aux_loss` holds the FLOPs loss of the pass (the training loop adds it); in eval every forward is logged for
    `sampling_report()`."""

    def __init__(self, token_budget: float = 0.5, flops_loss_weight: float = 2.0, budget_warmup: int = 1000,
                 budget_hold: int = 100, router_hidden_ratio: int = 16, router_bias_init: float = 35.0,
                 dynamic_width: bool = True, width_router_bias_init: float = 15.0, gate_tau: float = 5.0,
                 gumbel_noise: bool = True, **dit_kwargs):
        if not 0.0 < token_budget <= 1.0:
            raise ConfigError(f"model.token_budget={token_budget} must lie in (0, 1]: it is a fraction of the dense FLOPs")
        if flops_loss_weight < 0 or budget_warmup < 0 or budget_hold < 0:
            raise ConfigError("model.flops_loss_weight, budget_warmup and budget_hold must be >= 0")
        if router_hidden_ratio < 1 or gate_tau <= 0:
            raise ConfigError("model.router_hidden_ratio must be >= 1 and model.gate_tau > 0")
        if dit_kwargs.get("block_heads"):
            raise ConfigError("model.block_heads (a head-pruned DiT) is not supported by DyDiT, whose width routers "
                              "gate a fixed set of heads: leave model.block_heads=[]")
        heads = int(dit_kwargs.get("num_heads", 16))
        mlp_hidden = int(int(dit_kwargs.get("hidden_size", 1152)) * float(dit_kwargs.get("mlp_ratio", 4.0)))
        if dynamic_width and (heads < 2 or mlp_hidden % heads):
            raise ConfigError(f"model.dynamic_width needs num_heads >= 2 dividing the MLP width {mlp_hidden} (one "
                              f"channel group per head): change num_heads, or set model.dynamic_width=false")
        # Read by make_block / initialize_weights while DiT.__init__ builds the stack.
        self.router_hidden_ratio = router_hidden_ratio
        self.router_bias_init = router_bias_init
        self.dynamic_width = dynamic_width
        self.width_router_bias_init = width_router_bias_init
        self.gate_tau = gate_tau
        super().__init__(**dit_kwargs)
        self.token_budget = token_budget
        self.flops_loss_weight = flops_loss_weight
        self.budget_warmup = budget_warmup
        self.budget_hold = budget_hold
        self.gumbel_noise = gumbel_noise
        # Training passes seen so far: drives the budget schedule and the noise seed; saved with the weights.
        self.register_buffer("router_step", torch.zeros((), dtype=torch.long))
        self.aux_loss: Optional[torch.Tensor] = None
        self.last_block_fraction: Optional[torch.Tensor] = None  # mean r_n of the last training pass (detached)
        self.last_usage: list = []  # the last eval pass: per block None (did not run) or (heads, kept, token-groups)
        self.flops_log: list[tuple[float, int, list]] = []  # eval passes: (time, rows, usage)
        if dynamic_width:  # the width routers read the timestep embedding DiT.forward computes
            self.t_embedder.register_forward_hook(self._share_timestep_embedding)

    def make_block(self, index: int) -> nn.Module:
        return DyDiTBlock(self.hidden_size, self.num_heads, mlp_ratio=self.mlp_ratio,
                          router_hidden_ratio=self.router_hidden_ratio, gate_tau=self.gate_tau,
                          dynamic_width=self.dynamic_width)

    def initialize_weights(self) -> None:
        super().initialize_weights()  # routers: xavier weights, zero biases (DiT's _basic_init), as officially
        for block in self.blocks:
            nn.init.constant_(block.token_selection.mlp_head[2].bias, self.router_bias_init)
            if block.attn_rate is not None:
                nn.init.constant_(block.attn_rate.router.bias, self.width_router_bias_init)
                nn.init.constant_(block.mlp_rate.router.bias, self.width_router_bias_init)

    def _share_timestep_embedding(self, module, args, output) -> None:
        for block in self.blocks:
            block.timestep_embedding = output

    # ---------------------------------------------------------------- forward
    def budget_target(self, step: int) -> float:
        """The FLOPs-fraction target at training pass `step` (official warm-up: 1 -> lambda, 1.0 while held)."""
        if step < self.budget_hold:
            return 1.0
        if self.budget_warmup == 0:
            return self.token_budget
        return 1.0 - (1.0 - self.token_budget) * min(step / self.budget_warmup, 1.0)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        for block in self.blocks:
            block.token_mask = block.head_mask = block.group_mask = None  # a block a cache skips stays None
        if self.training:
            step = int(self.router_step)
            gen = torch.Generator().manual_seed(NOISE_SEED * 1_000_003 + step) if self.gumbel_noise else None
            for block in self.blocks:
                block.noise_generator = gen
        out = super().forward(x, t, y)
        for block in self.blocks:
            block.noise_generator = block.timestep_embedding = None  # this pass's only (keeps the model copyable)
        if self.training:
            fraction = self.block_flops_fraction()  # (N,), differentiable through the straight-through gates
            for block in self.blocks:  # the graph lives on in aux_loss only
                for name in ("token_mask", "head_mask", "group_mask"):
                    if getattr(block, name) is not None:
                        setattr(block, name, getattr(block, name).detach())
            self.last_block_fraction = fraction.detach().mean()
            self.aux_loss = (self.flops_loss_weight * (fraction.mean() - self.budget_target(step)) ** 2
                             if self.flops_loss_weight > 0 else None)
            with torch.no_grad():
                self.router_step += 1
        else:
            self.aux_loss = None
            self.last_usage = [self._usage(block) for block in self.blocks]
            self.flops_log.append((float(t.max()) if t.numel() else 0.0, x.shape[0], self.last_usage))
        return out

    def _usage(self, block: DyDiTBlock):
        """(active heads summed over rows, kept tokens, kept tokens x active channel groups) as 0-dim tensors."""
        keep = block.token_mask
        if keep is None:
            return None
        h, n = self.num_heads, keep.shape[0]
        heads = torch.tensor(n * h) if block.head_mask is None else block.head_mask.sum()
        if block.mlp_ran_dense:  # every token and channel went through the MLP
            return heads, keep.sum(), torch.tensor(n * keep.shape[1] * h)
        if block.head_mask is None:
            kept = keep.sum()
            return heads, kept, kept * h
        return heads, keep.sum(), (keep.sum(dim=1) * block.group_mask.sum(dim=1)).sum()

    # ------------------------------------------------------------------ FLOPs
    @property
    def num_tokens(self) -> int:
        return self.x_embedder.num_patches

    @property
    def mlp_hidden(self) -> int:
        return self.blocks[0].mlp.fc1.out_features

    def block_flops_fraction(self) -> torch.Tensor:
        """r_n (N,) of the last pass: sum_l (A * heads/H + M * groups/H * kept/T) / (L (A + M)) (official loss.py;
        blocks that did not run count nothing)."""
        costs = block_flops(self.num_tokens, self.hidden_size, self.mlp_hidden)
        total = None
        for block in self.blocks:
            keep = block.token_mask
            if keep is None:
                continue
            keep = keep if keep.is_floating_point() else keep.float()  # float64 gates stay float64
            tokens = keep.mean(dim=1)
            if block.head_mask is None:
                spent = costs["attn"] + costs["mlp"] * tokens
            else:
                heads = block.head_mask.to(keep.dtype).mean(dim=1)
                groups = block.group_mask.to(keep.dtype).mean(dim=1)
                spent = costs["attn"] * heads + costs["mlp"] * groups * tokens
            total = spent if total is None else total + spent
        if total is None:
            raise ValueError("no block ran in this forward pass")
        return total / (len(self.blocks) * (costs["attn"] + costs["mlp"]))

    def dense_flops(self, rows: int = 1) -> int:
        """FLOPs of a dense DiT of the same configuration over `rows` inputs."""
        return dit_flops(rows, self.num_tokens, self.hidden_size, self.mlp_hidden, len(self.blocks), self.patch_size,
                         self.in_channels, self.out_channels, self.t_embedder.frequency_embedding_size)

    def flops(self, rows: int, usage: Sequence) -> int:
        """FLOPs of one eval forward over `rows` inputs; usage[l] is None when block l did not run, else (active heads
        summed over rows, kept tokens, sum over kept tokens of their row's active channel groups) -- `last_usage`.
        Every block that ran pays its adaLN and routers in full; attention per active head; the MLP per kept
        token and active channel group."""
        t, d, h = self.num_tokens, self.hidden_size, self.num_heads
        costs = block_flops(t, d, self.mlp_hidden)
        r = self.blocks[0].token_selection.hidden
        routers = 2 * t * (d * r + r) + (2 * 2 * d * (h - 1) if self.dynamic_width else 0)
        full_block = 2 * d * 6 * d + costs["attn"] + costs["mlp"]
        flops = self.dense_flops(rows) - rows * len(self.blocks) * full_block
        for u in usage:
            if u is None:
                continue
            heads, _, token_groups = (int(v) for v in u)
            flops += rows * (2 * d * 6 * d + routers) + heads * costs["attn"] // h
            flops += token_groups * (costs["mlp"] // (t * h))
        return flops

    # ------------------------------------------------------------ dense start
    ROUTER_KEYS = (".token_selection.", ".attn_rate.", ".mlp_rate.")

    def convert_state_dict(self, sd: dict) -> dict:
        """A dense DiT state dict (no routers) -> this model's, so that `train.init_from` / `load_pretrained` can
        start a DyDiT from a pretrained DiT, as the paper fine-tunes one: the routers keep their current
        initialisation, under which every token, head and channel group passes, so the model starts as that DiT.
        A DyDiT state dict passes unchanged."""
        if any(r in k for k in sd for r in self.ROUTER_KEYS):
            return dict(sd)
        own = self.state_dict()
        routers = {k: v for k, v in own.items() if any(r in k for r in self.ROUTER_KEYS) or k == "router_step"}
        return {**sd, **routers}

    # -------------------------------------------------------------- reporting
    def reset_sampling_report(self) -> None:
        self.flops_log.clear()

    def sampling_report(self) -> dict:
        """FLOPs of the eval forwards since the last reset. Calls are grouped into sampling runs (a run starts when
        the model time goes up or the batch size changes: samplers walk from noise to data); step k of the report
        sums call k of every run. Per-step values are per row (one latent through the network: a guided step
        runs two rows per image)."""
        depth, h, t = len(self.blocks), self.num_heads, self.num_tokens
        steps_flops, steps_rows = [], []
        heads, kept, work, ran_rows = [0] * depth, [0] * depth, [0] * depth, [0] * depth
        total = dense = 0
        prev, k = None, 0
        for time, rows, usage in self.flops_log:
            k = 0 if prev is None or time > prev[0] or rows != prev[1] else k + 1
            prev = (time, rows)
            spent = self.flops(rows, usage)
            total, dense = total + spent, dense + self.dense_flops(rows)
            if k == len(steps_flops):
                steps_flops.append(0)
                steps_rows.append(0)
            steps_flops[k] += spent
            steps_rows[k] += rows
            for i, u in enumerate(usage):
                if u is not None:
                    heads[i], kept[i], work[i] = heads[i] + int(u[0]), kept[i] + int(u[1]), work[i] + int(u[2])
                    ran_rows[i] += rows
        per_row_dense = self.dense_flops(1)
        costs = block_flops(t, self.hidden_size, self.mlp_hidden)

        def frac(values, per_row):
            return [round(v / (n * per_row), 6) if n else None for v, n in zip(values, ran_rows)]

        head_frac, mlp_frac = frac(heads, h), frac(work, t * h)
        ran = [(a, m) for a, m in zip(head_frac, mlp_frac) if a is not None]
        block_fraction = (sum(costs["attn"] * a + costs["mlp"] * m for a, m in ran) / (depth * (costs["attn"] + costs["mlp"]))
                          if ran else None)
        return {
            "name": "dydit",
            "flops_unit": "FLOPs = 2 x multiply-adds (torch FlopCounterMode); per row = one latent per model call",
            "model_calls": len(self.flops_log),
            "flops_per_step": [round(f / r, 1) for f, r in zip(steps_flops, steps_rows)],
            "flops_fraction_per_step": [round(f / (r * per_row_dense), 6) for f, r in zip(steps_flops, steps_rows)],
            "flops_total": total,
            "dense_flops_total": dense,
            "flops_fraction": round(total / dense, 6) if dense else None,
            "dense_flops_per_row": per_row_dense,
            "block_flops_fraction": round(block_fraction, 6) if block_fraction is not None else None,
            "token_budget": self.token_budget,
            "tokens_kept_fraction_per_block": frac(kept, t),
            "heads_active_fraction_per_block": head_frac,
            "mlp_flops_fraction_per_block": mlp_frac,
        }


#################################################################################
#                                    Registry                                   #
#################################################################################


@MODELS.register("dydit", config=DyDiTConfig,
                 help="DyDiT (DiT with learned token / head / channel routing under a FLOPs budget, Zhao et al. 2025)")
def build_dydit(cfg) -> DyDiT:
    """DyDiT (DiT with learned token / head / channel routing under a FLOPs budget, Zhao et al. 2025)."""
    return DyDiT(**section_kwargs(cfg, DyDiTConfig))
