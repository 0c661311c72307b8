"""MusicCM's discriminator: a frozen audio feature network, light trainable heads, hinge loss and R1 penalty.

MusicCM (Fei et al. 2024, arXiv 2404.13358) follows ADD (Sauer et al. 2023): the discriminator is a frozen
pre-trained feature network F (MusicCM: AudioMAE ViT-B on mel spectrograms) with small trainable heads D_φ,l on
the token features of several of its layers; hinge loss, and an R1 gradient penalty on real data taken with
respect to the heads' inputs (the features), so F is never differentiated twice:

    L_D   = E_real[ max(0, 1 − D(x)) ] + E_fake[ max(0, 1 + D(x̂0)) ] + (γ / 2) · R1
    L_adv = − E_fake[ D(x̂0) ]                      (the generator's term; D sees F(x̂0), gradient flows to x̂0)
    R1    = E_real ‖∇_h D(h)‖²,  h = F(x) of real data

Here every token's logit is a discriminator output (ADD's token-wise heads); expectations average over tokens
and layers, and R1 is the squared gradient norm of the sum of a sample's logits per token (for token-wise heads:
the mean over tokens of each token's own squared gradient norm; a linear head w·h gives R1 = ‖w‖² exactly).

What the paper does not specify and ditk chose:
  - the feature network: `teacher` (default) = the frozen FluxMusic teacher itself on the clean spectrogram
    (model time 0), its music tokens after blocks evenly spaced over its depth (ADD's 4 layers: 2, 5, 8, 11 of
    12; here ((k + 1) · depth) // 4 − 1, k = 0..3), as LADD uses the teacher as feature network; or an A-JEPA run
    (ditk's in-family self-supervised masked audio ViT, the counterpart of AudioMAE) whose target encoder sees
    the same normalised log-mel window;
  - the heads: per layer LayerNorm → Linear(D, hidden) → LeakyReLU(0.2) → Linear(hidden, 1) on each token, plus
    a projection-discriminator term ⟨φ(h), W c⟩ / sqrt(hidden) with the pooled text embedding c (ADD conditions
    its heads on the text embedding the same way); no spectral norm;
  - the heads' optimizer: AdamW with betas (0, 0.99) (StyleGAN2's for its discriminator), no weight decay, and the
    run's learning rate (`disc_lr` overrides).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F


def evenly_spaced_blocks(depth: int, count: int = 4) -> List[int]:
    """ADD's choice of feature layers: ((k + 1) · depth) // count − 1 for k < count (12 → 2, 5, 8, 11)."""
    return sorted({max(0, (k + 1) * depth // count - 1) for k in range(count)})


class _Stop(Exception):
    """Raised by the hook of the deepest selected block: the feature network's later layers are not needed."""


class FeatureNetwork:
    """A frozen network's token features at selected blocks: x (N, C, F, T) -> [(N, tokens, D)] per block.

    `call(net, x, cond)` runs the network (the FluxMusic teacher at model time 0, or an A-JEPA target encoder);
    `net.blocks` holds its blocks. A block's output is a tensor (N, L, D) (its last `tokens` entries are the
    music patches: a single-stream FluxMusic block puts the text first) or a tuple whose first entry is the music
    stream (a double-stream block's (img, txt))."""

    def __init__(self, net: nn.Module, block_ids: Sequence[int], patch: int, dim: int, call):
        self.net = net
        self.block_ids = sorted(int(i) for i in block_ids)
        self.patch, self.dim, self.call = int(patch), int(dim), call

    def __call__(self, x: torch.Tensor, cond: dict) -> List[torch.Tensor]:
        tokens = (x.shape[-2] // self.patch) * (x.shape[-1] // self.patch)
        found, handles = {}, []
        last = self.block_ids[-1]

        def grab(i):
            def hook(module, inputs, output):
                out = output[0] if isinstance(output, tuple) else output
                found[i] = out[:, -tokens:]
                if i == last:
                    raise _Stop
            return hook

        for i in self.block_ids:
            handles.append(self.net.blocks[i].register_forward_hook(grab(i)))
        try:
            self.call(self.net, x, cond)
        except _Stop:
            pass
        finally:
            for h in handles:
                h.remove()
        return [found[i] for i in self.block_ids]


class Head(nn.Module):
    """Token-wise head: logit(h) = w2 · φ(h) + b (+ ⟨φ(h), W c⟩ / sqrt(hidden)), φ = LeakyReLU(W1 LN(h))."""

    def __init__(self, dim: int, hidden: int, cond_dim: int = 0):
        super().__init__()
        self.norm = nn.LayerNorm(dim)  # blocks' features differ in scale by orders of magnitude
        self.fc = nn.Linear(dim, hidden)
        self.out = nn.Linear(hidden, 1)
        self.embed = nn.Linear(cond_dim, hidden, bias=False) if cond_dim else None
        self.hidden = hidden

    def forward(self, h: torch.Tensor, c: Optional[torch.Tensor] = None) -> torch.Tensor:
        phi = F.leaky_relu(self.fc(self.norm(h)), 0.2)
        logit = self.out(phi)[..., 0]
        if self.embed is not None and c is not None:
            logit = logit + (phi * self.embed(c.to(phi.dtype))[:, None]).sum(-1) / math.sqrt(self.hidden)
        return logit


class Discriminator(nn.Module):
    """The trainable part: one head per feature layer; logits of all layers' tokens concatenated (N, ΣL)."""

    def __init__(self, dims: Sequence[int], hidden: int, cond_dim: int = 0):
        super().__init__()
        self.heads = nn.ModuleList([Head(d, hidden, cond_dim) for d in dims])

    def forward(self, feats: Sequence[torch.Tensor], c: Optional[torch.Tensor] = None) -> torch.Tensor:
        return torch.cat([head(h, c) for head, h in zip(self.heads, feats)], dim=1)


def hinge_d_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """Per sample: mean over tokens of max(0, 1 − D(real)) + mean of max(0, 1 + D(fake))."""
    return F.relu(1.0 - real_logits).flatten(1).mean(1) + F.relu(1.0 + fake_logits).flatten(1).mean(1)


def hinge_g_loss(fake_logits: torch.Tensor) -> torch.Tensor:
    """Per sample: − mean over tokens of D(fake)."""
    return -fake_logits.flatten(1).mean(1)


def r1_penalty(logits: torch.Tensor, feats: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per sample ‖∇_h Σ_tokens D(h)‖² / tokens (h: every layer's features, which must require grad); keeps the
    graph so the penalty trains the heads (a double backward through the heads only)."""
    grads = torch.autograd.grad(logits.sum(), list(feats), create_graph=True)
    squared = sum(g.pow(2).flatten(1).sum(1) for g in grads)
    return squared / logits.shape[1]
