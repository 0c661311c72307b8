"""DiT-MoE: DiT whose MLPs are sparse mixtures of experts (Fei et al. 2024, "Scaling Diffusion Transformers
to 16 Billion Parameters"; feizc/DiT-MoE models.py).

Every block is DiT's adaLN-Zero block (`ditk.models.dit.DiTBlock`) with its MLP replaced by `SparseMoE`:

    y = shared(x) + sum_{e in topk(p)} p_e * expert_e(x),   p = softmax(W_gate x)

- router: a bias-free linear map to E logits, softmax, top-k (k = 2); the k weights are the softmax
  probabilities themselves, *not* renormalised to sum to 1 (the official `norm_topk_prob = False`);
- routed experts: SwiGLU MLPs (gate/up/down projections without bias), intermediate width mlp_ratio * D;
- shared experts: always active for every token. The official code fuses its "2 shared experts" into one
  SwiGLU of width 2D (`n_shared_experts * D`); a SwiGLU of width 2D is exactly the sum of two SwiGLUs of
  width D (split the intermediate channels), so `num_shared_experts` counts experts of width D;
- expert-level balance loss (Switch/DeepSeek-MoE style), alpha * sum_i f_i P_i with f_i = E * (fraction of
  the M*k routing slots that chose expert i) and P_i = mean router probability of expert i over the M tokens
  of the forward pass (the official `seq_aux = False`). The official code attaches it to the graph with a
  custom autograd function; here the MoE layer stores it in `self.aux_loss` and the training loop adds it.

Capacity: the official code has none (every token reaches its k experts, in training and inference).
`capacity_factor > 0` adds GShard-style capacity as an option: each expert takes at most
ceil(capacity_factor * M * k / E) slots per forward pass, first choices before second choices and earlier
tokens first; overflowing slots are dropped (the token keeps its shared-expert output and the residual).

Official differences on purpose: one dispatch path for training and inference (the official code has a
`repeat_interleave` path for training and a sorted `moe_infer` for eval; both compute the same sum), the router
softmax is evaluated in float32, and the XL/G QK-LayerNorm attention uses PyTorch SDPA with ditk's hook points
instead of flash-attn with q/k cast to fp16. State-dict names differ from the official checkpoints only in
`blocks.i.mlp.*` (official `blocks.i.moe.*`) and, with qk_norm, `attn.qkv` / `attn.proj` (official
`attn.Wqkv` / `attn.out_proj`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import section_kwargs
from ..errors import ConfigError
from ..registry import MODELS
from .dit import DiT, DiTBlock, DiTConfig
from .layers import Attention, Mlp

EXPERT_TYPES = ("swiglu", "gelu")

# Paper Table 1 sizes: (depth, hidden_size, num_heads); patch 2, top-2 of 8 or 16 experts, every block MoE.
DIT_MOE_SIZES = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    "G": (40, 1408, 16),
}


@dataclass
class DiTMoEConfig(DiTConfig):
    num_experts: int = 8  # routed experts per MoE layer (E)
    top_k: int = 2  # experts each token is routed to (the official `num_experts_per_tok`)
    num_shared_experts: int = 2  # always-active experts of width hidden_size (fused into one SwiGLU)
    expert_type: str = "swiglu"  # swiglu (official) | gelu (DiT's MLP, e.g. to upcycle a dense DiT)
    aux_loss_alpha: float = 0.01  # balance-loss weight: official code 0.01, paper's default 0.005; 0 = off
    capacity_factor: float = 0.0  # 0 = no capacity limit (official); > 0 = GShard-style token dropping
    qk_norm: bool = False  # per-head LayerNorm on q and k (the official XL/G attention)


#################################################################################
#                                   Experts                                     #
#################################################################################


class SwiGLU(nn.Module):
    """down(silu(gate(x)) * up(x)), no biases (LLaMA's MLP; the official `MoeMLP` with its names)."""

    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.gate_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.up_proj = nn.Linear(hidden_size, intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


def make_expert(kind: str, hidden_size: int, intermediate_size: int) -> nn.Module:
    if kind == "swiglu":
        return SwiGLU(hidden_size, intermediate_size)
    if kind == "gelu":
        return Mlp(hidden_size, intermediate_size)
    raise ConfigError(f"unknown model.expert_type '{kind}': use one of {', '.join(EXPERT_TYPES)}")


#################################################################################
#                               Router and MoE layer                            #
#################################################################################


class Router(nn.Module):
    """tokens (M, D) -> (top-k expert ids (M, k) long, their weights (M, k), all probabilities (M, E) float32 or float64).

    A bias-free linear map (the official `MoEGate.weight`, shape (E, D), kaiming-uniform init like nn.Linear),
    softmax (in float32 at least, also under bf16/fp16 autocast), top-k with the k choices sorted by probability (first choice first). The weights are the
    probabilities themselves (not renormalised over the k choices), in the input's dtype.
    """

    def __init__(self, hidden_size: int, num_experts: int, top_k: int):
        super().__init__()
        self.num_experts = num_experts
        self.top_k = top_k
        self.weight = nn.Parameter(torch.empty(num_experts, hidden_size))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))

    def forward(self, tokens: torch.Tensor):
        logits = F.linear(tokens, self.weight)
        probs = logits.to(torch.promote_types(logits.dtype, torch.float32)).softmax(dim=-1)  # >= fp32
        weights, experts = torch.topk(probs, self.top_k, dim=-1, sorted=True)
        return experts, weights.to(tokens.dtype), probs


def balance_loss(probs: torch.Tensor, experts: torch.Tensor, num_experts: int, alpha: float) -> torch.Tensor:
    """Expert-level balance loss alpha * sum_i f_i * P_i over one forward pass.

    probs (M, E) router probabilities; experts (M, k) chosen ids. f_i = E * (slots routed to i) / (M * k), so
    f_i = 1 for every expert under perfect balance; P_i = mean_m probs[m, i]. Gradients reach the router
    through P (f is a count).
    """
    counts = torch.bincount(experts.reshape(-1), minlength=num_experts).to(probs.dtype)
    f = counts * (num_experts / experts.numel())
    return alpha * (f * probs.mean(dim=0)).sum()


def capacity_keep(experts: torch.Tensor, num_experts: int, capacity: int) -> torch.Tensor:
    """(M, k) bool: which routing slots fit into `capacity` slots per expert.

    Priority: all first choices (in token order), then all second choices, ... (GShard). A slot is kept if
    fewer than `capacity` earlier-priority slots went to the same expert.
    """
    m, k = experts.shape
    by_priority = experts.t().reshape(-1)  # choice-rank major, then token order
    one_hot = F.one_hot(by_priority, num_experts)
    position = ((one_hot.cumsum(dim=0) - 1) * one_hot).sum(dim=-1)  # index of the slot within its expert
    return (position < capacity).reshape(k, m).t()


class SparseMoE(nn.Module):
    """Shared experts + top-k routed experts over the tokens of x (..., D); returns the same shape.

    After a forward in training mode with aux_loss_alpha > 0, `self.aux_loss` holds the balance loss of that
    pass (the training loop adds every module's `aux_loss`); otherwise it is None.
    """

    def __init__(self, hidden_size: int, num_experts: int = 8, top_k: int = 2, mlp_ratio: float = 4.0,
                 num_shared_experts: int = 2, expert_type: str = "swiglu", aux_loss_alpha: float = 0.01,
                 capacity_factor: float = 0.0):
        super().__init__()
        if num_experts < 1 or not 1 <= top_k <= num_experts:
            raise ConfigError(f"model.top_k={top_k} must lie in 1..model.num_experts={num_experts}: lower top_k")
        if num_shared_experts < 0 or aux_loss_alpha < 0 or capacity_factor < 0:
            raise ConfigError("model.num_shared_experts, aux_loss_alpha and capacity_factor must be >= 0")
        self.num_experts = num_experts
        self.top_k = top_k
        self.aux_loss_alpha = aux_loss_alpha
        self.capacity_factor = capacity_factor
        self.gate = Router(hidden_size, num_experts, top_k)
        self.experts = nn.ModuleList(
            [make_expert(expert_type, hidden_size, int(hidden_size * mlp_ratio)) for _ in range(num_experts)]
        )
        # n shared experts of width D fused into one of width n * D (the official layout and names).
        self.shared_experts = SwiGLU(hidden_size, num_shared_experts * hidden_size) if num_shared_experts else None
        self.aux_loss = None

    def capacity(self, num_tokens: int) -> int:
        return math.ceil(self.capacity_factor * num_tokens * self.top_k / self.num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        tokens = x.reshape(-1, shape[-1])  # (M, D): every token of the batch is routed on its own
        experts, weights, probs = self.gate(tokens)
        self.aux_loss = (
            balance_loss(probs, experts, self.num_experts, self.aux_loss_alpha)
            if self.training and self.aux_loss_alpha > 0 else None
        )

        # Dispatch: the M*k (token, expert, weight) slots, grouped by expert with one stable sort.
        m = tokens.shape[0]
        slot_expert = experts.reshape(-1)
        slot_weight = weights.reshape(-1)
        slot_token = torch.arange(m, device=tokens.device).repeat_interleave(self.top_k)
        if self.capacity_factor > 0:
            keep = capacity_keep(experts, self.num_experts, self.capacity(m)).reshape(-1)
            slot_expert, slot_weight, slot_token = slot_expert[keep], slot_weight[keep], slot_token[keep]
        order = torch.argsort(slot_expert, stable=True)
        counts = torch.bincount(slot_expert, minlength=self.num_experts).tolist()

        out = tokens.new_zeros(tokens.shape)
        start = 0
        for e, expert in enumerate(self.experts):
            slots = order[start:start + counts[e]]
            start += counts[e]
            if not slots.numel() and not self.training:
                continue  # in training an idle expert still runs (on 0 tokens) so DDP sees all parameters used
            token_ids = slot_token[slots]
            y = expert(tokens[token_ids]) * slot_weight[slots, None]
            out.index_add_(0, token_ids, y.to(out.dtype))  # combine: sum of weighted expert outputs
        if self.shared_experts is not None:
            out = out + self.shared_experts(tokens).to(out.dtype)
        return out.reshape(shape)


class QKNormAttention(Attention):
    """ditk's Attention (same qkv/proj and hook points) with a per-head LayerNorm (affine, eps 1e-6) on q and k
    before the dot product: the official DiT-MoE XL/G attention (`FlashSelfMHAModified(qk_norm=True)`).
    The hooks see q and k after the normalisation."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True, head_dim: int | None = None):
        super().__init__(dim, num_heads, qkv_bias=qkv_bias, head_dim=head_dim)
        self.q_norm = nn.LayerNorm(self.head_dim, eps=1e-6)
        self.k_norm = nn.LayerNorm(self.head_dim, eps=1e-6)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, d = x.shape
        qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        q, k, v = self.q_hook(self.q_norm(q)), self.k_hook(self.k_norm(k)), self.v_hook(v)
        x = F.scaled_dot_product_attention(q, k, v)
        x = self.out_hook(x.transpose(1, 2).reshape(n, t, self.inner_dim))
        return self.proj(x)


#################################################################################
#                                    Model                                      #
#################################################################################


class DiTMoE(DiT):
    """DiT with a SparseMoE in place of every block's MLP. Same embedders, blocks (`DiTBlock`), final layer,
    initialisation and forward as ditk's DiT; model(x, t, y) -> (N, out_channels, H, W)."""

    def __init__(self, num_experts: int = 8, top_k: int = 2, num_shared_experts: int = 2,
                 expert_type: str = "swiglu", aux_loss_alpha: float = 0.01, capacity_factor: float = 0.0,
                 qk_norm: bool = False, **dit_kwargs):
        if expert_type not in EXPERT_TYPES:
            raise ConfigError(f"unknown model.expert_type '{expert_type}': use one of {', '.join(EXPERT_TYPES)}")
        # Read by make_block while DiT.__init__ builds the stack (plain values may be set before Module init).
        self.moe_options = dict(num_experts=num_experts, top_k=top_k, num_shared_experts=num_shared_experts,
                                expert_type=expert_type, aux_loss_alpha=aux_loss_alpha,
                                capacity_factor=capacity_factor)
        self.qk_norm = qk_norm
        super().__init__(**dit_kwargs)

    def make_block(self, index: int) -> nn.Module:
        d = self.hidden_size
        heads, head_dim = self.heads_of(index), d // self.num_heads
        # Construction order as before per-block heads existed (seeded inits unchanged): the QK-norm attention
        # before the experts, the plain attention after them.
        attn = QKNormAttention(d, heads, head_dim=head_dim) if self.qk_norm else None
        moe = SparseMoE(d, mlp_ratio=self.mlp_ratio, **self.moe_options)
        if attn is None:
            attn = Attention(d, heads, qkv_bias=True, head_dim=head_dim)
        return DiTBlock(d, heads, attn=attn, mlp=moe)

    def initialize_weights(self) -> None:
        super().initialize_weights()  # experts/shared: xavier (nn.Linear); router keeps kaiming-uniform
        # The official DiT-MoE initialize_weights also zeroes the patch-embedding bias (ditk's DiT keeps the conv default).
        nn.init.constant_(self.x_embedder.proj.bias, 0)

    @staticmethod
    def convert_state_dict(sd: dict) -> dict:
        """Official feizc/DiT-MoE state dict -> ditk names (ditk's own names pass unchanged):
        blocks.i.moe.* -> blocks.i.mlp.*, and for the XL/G attention attn.Wqkv -> attn.qkv, attn.out_proj -> attn.proj.
        Everything else (embedders, adaLN, final layer, experts' gate/up/down_proj, router `gate.weight`,
        `shared_experts`, q_norm/k_norm) already has ditk's names."""
        renames = ((".moe.", ".mlp."), (".attn.Wqkv.", ".attn.qkv."), (".attn.out_proj.", ".attn.proj."))
        out = {}
        for key, value in sd.items():
            for old, new in renames:
                key = key.replace(old, new)
            out[key] = value
        return out

    def moe_layers(self) -> list[tuple[str, SparseMoE]]:
        """(name, layer) of every MoE layer, in depth order."""
        return [(name, m) for name, m in self.named_modules() if isinstance(m, SparseMoE)]

    def parameter_report(self) -> dict[str, int]:
        """Total, trainable and activated parameters. Activated = what one token uses: everything except the
        (E - k) routed experts it is not sent to in each MoE layer (the paper's "activated" column)."""
        total = sum(p.numel() for p in self.parameters())
        trainable = sum(p.numel() for p in self.parameters() if p.requires_grad)
        idle = 0
        for _, layer in self.moe_layers():
            per_expert = sum(p.numel() for p in layer.experts[0].parameters())
            idle += (layer.num_experts - layer.top_k) * per_expert
        return {"total": total, "trainable": trainable, "activated": total - idle}


def dit_moe_size_config(size: str, num_experts: int = 8, patch_size: int = 2, **overrides) -> DiTMoEConfig:
    """DiTMoEConfig for a named size, e.g. dit_moe_size_config("XL", 8) is DiT-MoE-XL/2-8E2A."""
    if size not in DIT_MOE_SIZES:
        raise ConfigError(f"unknown DiT-MoE size '{size}': choose one of {', '.join(DIT_MOE_SIZES)}")
    depth, hidden_size, num_heads = DIT_MOE_SIZES[size]
    return DiTMoEConfig(patch_size=patch_size, depth=depth, hidden_size=hidden_size, num_heads=num_heads,
                        num_experts=num_experts, **overrides)


@MODELS.register("dit-moe", config=DiTMoEConfig, help="DiT-MoE (DiT with shared + top-k routed experts, Fei et al. 2024)")
def build_dit_moe(cfg) -> DiTMoE:
    """DiT-MoE (DiT with shared + top-k routed experts, Fei et al. 2024)."""
    return DiTMoE(**section_kwargs(cfg, DiTMoEConfig))
