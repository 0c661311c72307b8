"""The autoregressive baseline for Prefix-diffusion: the same captioner made left-to-right.

ClipCap-style (Mokady et al. 2021): the image prefix from the same mapping network, then the caption's tokens, through
causal pre-LN transformer layers; each position predicts the next token through the head tied to the embedding
table. Same tokenizer, embedding width, up-projection, width, depth and mapping network as `caption-dit`, so the
two differ only in how the caption is generated (one token at a time vs. denoising all tokens together), not in
size: the benchmark compares them on the same data (benchmarks/bench_caption.py).

model(ids (N, L), t, prefix (N, S, F)) -> next-token logits (N, L - 1, V) for ids[:, 1:].
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn as nn

from ..config import section_kwargs
from ..errors import ConfigError
from ..registry import MODELS
from .caption_dit import MappingNetwork, TransformerBlock, WordEmbedding
from .layers import xavier_init_linears


@dataclass
class CaptionARConfig:
    vocab_size: int = 30522
    vocab_ids: List[int] = field(default_factory=list)
    embed_dim: int = 16
    seq_len: int = 16
    feature_dim: int = 64
    prefix_len: int = 4
    mapping_depth: int = 1
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0


class CaptionAR(nn.Module):
    learn_sigma = False
    num_classes = 0
    modality = "caption"

    def __init__(self, vocab_size=30522, vocab_ids=(), embed_dim=16, seq_len=16, feature_dim=64, prefix_len=4, mapping_depth=1,
                 hidden_size=128, depth=4, num_heads=4, mlp_ratio=4.0):
        super().__init__()
        self.seq_len, self.embed_dim, self.prefix_len = seq_len, embed_dim, prefix_len
        self.latent_shape = (seq_len,)
        self.word_embedding = WordEmbedding(vocab_size, embed_dim, vocab_ids)
        self.mapping = MappingNetwork(feature_dim, hidden_size, prefix_len, mapping_depth, num_heads)
        self.input_proj = nn.Sequential(nn.Linear(embed_dim, hidden_size), nn.Tanh(), nn.Linear(hidden_size, hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, prefix_len + seq_len, hidden_size))
        self.blocks = nn.ModuleList([TransformerBlock(hidden_size, num_heads, mlp_ratio, causal=True)
                                     for _ in range(depth)])
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.output_proj = nn.Linear(hidden_size, embed_dim)  # back to the embedding width, then the tied head
        xavier_init_linears(self)
        nn.init.normal_(self.pos_embed, std=0.02)

    def check_data(self, data_shape: tuple, num_classes: int) -> None:
        if tuple(data_shape) != (self.seq_len,):
            raise ConfigError(f"the data gives captions of {data_shape[0]} tokens but model.seq_len={self.seq_len}: "
                              f"set model.seq_len={data_shape[0]}")

    def targets(self, ids: torch.Tensor) -> torch.Tensor:
        return self.word_embedding.ids_to_rows(ids)

    def forward(self, ids: torch.Tensor, t=None, prefix: torch.Tensor = None) -> torch.Tensor:
        """Logits (over the vocabulary's rows) of token j+1 at every caption position j (after the prefix)."""
        p = self.mapping(prefix)
        h = torch.cat([p, self.input_proj(self.word_embedding(ids))], dim=1)
        h = h + self.pos_embed[:, : h.shape[1]]
        for block in self.blocks:
            h = block(h)
        h = self.norm(h[:, self.prefix_len:])
        return self.word_embedding.logits(self.output_proj(h))

    @torch.no_grad()
    def generate(self, prefix: torch.Tensor, bos: int, eos: int, pad: int, generators, temperature: float = 1.0):
        """Sample captions token by token (ancestral sampling at `temperature`; 0 = greedy), each row from its own
        generator. Rows stop at `eos`; the rest of the row is `pad`. Returns (N, seq_len) ids."""
        n = prefix.shape[0]
        ids = torch.full((n, 1), bos, dtype=torch.long, device=prefix.device)
        done = torch.zeros(n, dtype=torch.bool, device=prefix.device)
        for _ in range(self.seq_len - 1):
            logits = self.forward(ids, None, prefix)[:, -1].float()
            if temperature > 0:
                probs = torch.softmax(logits / temperature, dim=-1).cpu()
                nxt = torch.stack([torch.multinomial(probs[i], 1, generator=g) for i, g in enumerate(generators)])
                nxt = nxt.to(prefix.device).view(n)
            else:
                nxt = logits.argmax(dim=-1)
            nxt = self.word_embedding.rows_to_ids(nxt)
            nxt = torch.where(done, torch.full_like(nxt, pad), nxt)
            done |= nxt == eos
            ids = torch.cat([ids, nxt[:, None]], dim=1)
        return ids


@MODELS.register("caption-ar", config=CaptionARConfig,
                 help="autoregressive captioning baseline (ClipCap-style prefix + causal transformer)")
def build_caption_ar(cfg) -> CaptionAR:
    """Autoregressive captioning baseline (ClipCap-style prefix + causal transformer)."""
    return CaptionAR(**section_kwargs(cfg, CaptionARConfig))
