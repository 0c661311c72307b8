"""Prefix-diffusion's captioner: a DiT over word embeddings with image-prefix tokens prepended.

Prefix-diffusion (Liu, Li, Fei, Fu, Luo, Guo, "Prefix-diffusion: A Lightweight Diffusion Model for Diverse Image
Captioning", LREC-COLING 2024, arXiv 2309.04965) generates a caption with Diffusion-LM (Li et al., NeurIPS 2022):
every token is a learned embedding, the sequence of embeddings is diffused and denoised as a continuous signal,
and the result is rounded back to tokens. The image enters as *prefix embeddings*: features of a frozen
pre-trained image encoder (CLIP ViT-B/32 in the paper), turned by a small trainable mapping network into a few
vectors that are prepended to the noisy word embeddings in the denoiser's input, so every layer attends to them.

What is taken from where (the paper's own code was not available here; its abstract fixes the design above):
- Diffusion-LM (XiangLi1999/Diffusion-LM, improved-diffusion/improved_diffusion/transformer_model2.py and
  gaussian_diffusion.py): a word-embedding table of small width (16 for E2E) initialised N(0, 1); an up-projection
  Linear-Tanh-Linear from it to the transformer width; learned position embeddings; the model predicts x0 (the
  clean embeddings); the LM head that rounds is tied to the embedding table (logits = x E^T); rounding by the
  nearest embedding for the clamping trick. The loss is in `ditk.objectives.diffusion_lm`.
- The mapping network follows ClipCap's transformer mapper (Mokady et al. 2021, which the paper's "prefix" and
  "mapping network" come from): image feature tokens and `prefix_len` learned constant queries go through a few
  transformer layers; the query outputs are the prefix. With one feature vector (CLIP) this is ClipCap's mapper.
- Choices of ours: the denoiser is ditk's DiT stack (adaLN-Zero blocks, timestep through adaLN, not added to the
  tokens as in Diffusion-LM's BERT) over [prefix; words]; its output head is DiT's final layer on the word
  positions only, projecting straight to the embedding width (Diffusion-LM: Linear-Tanh-Linear).

model(x_t (N, L, D), t (N,), prefix (N, S, F)) -> predicted x0 (N, L, D).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import section_kwargs
from ..errors import ConfigError
from ..registry import MODELS
from .dit import DiTBlock
from .layers import Attention, FinalLayer, Mlp, TimestepEmbedder, xavier_init_linears


@dataclass
class CaptionDiTConfig:
    vocab_size: int = 30522  # the tokenizer's vocabulary (all-MiniLM-L6-v2 / BERT uncased: 30522)
    vocab_ids: List[int] = field(default_factory=list)  # the model's vocabulary (tokenizer ids); empty: all of them
    embed_dim: int = 16  # width of the diffused word embeddings (Diffusion-LM: 16 on E2E, 128 on ROCStories)
    seq_len: int = 16  # caption tokens, [CLS]/[SEP]/[PAD] included (must equal data.seq_len)
    feature_dim: int = 64  # width of the image conditioner's feature tokens (digits CNN 64, CLIP ViT-B/32 512)
    prefix_len: int = 4  # prefix embeddings the mapping network makes
    mapping_depth: int = 1  # transformer layers of the mapping network (ClipCap: 8)
    hidden_size: int = 128
    depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0


class TransformerBlock(nn.Module):
    """Pre-LN transformer layer (attention + GELU MLP), optionally causal: the mapping network's layer, and the
    autoregressive baseline's."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, causal: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.attn = Attention(hidden_size, num_heads)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        self.causal = causal

    def _attend(self, x: torch.Tensor) -> torch.Tensor:
        a = self.attn
        n, t, d = x.shape
        q, k, v = a.qkv(x).reshape(n, t, 3, a.num_heads, a.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        q, k, v = a.q_hook(q), a.k_hook(k), a.v_hook(v)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return a.proj(a.out_hook(out.transpose(1, 2).reshape(n, t, d)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self._attend(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class MappingNetwork(nn.Module):
    """ClipCap's transformer mapper: feature tokens (N, S, F) -> prefix (N, P, H).

    The features are projected to the width H and followed by P learned queries; `depth` transformer layers mix
    them and the P query outputs are the prefix. depth 0: the queries plus the mean projected feature."""

    def __init__(self, feature_dim: int, hidden_size: int, prefix_len: int, depth: int, num_heads: int):
        super().__init__()
        self.proj = nn.Linear(feature_dim, hidden_size)
        self.queries = nn.Parameter(torch.randn(prefix_len, hidden_size) * 0.02)
        self.layers = nn.ModuleList([TransformerBlock(hidden_size, num_heads) for _ in range(depth)])
        self.feature_dim = feature_dim

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        if features.shape[-1] != self.feature_dim:
            raise ConfigError(f"the image encoder gives {features.shape[-1]}-d features but model.feature_dim="
                              f"{self.feature_dim}: set model.feature_dim={features.shape[-1]}")
        h = self.proj(features)
        q = self.queries.expand(h.shape[0], -1, -1)
        if not self.layers:
            return q + h.mean(dim=1, keepdim=True)
        x = torch.cat([h, q], dim=1)
        for layer in self.layers:
            x = layer(x)
        return x[:, h.shape[1]:]


class WordEmbedding(nn.Module):
    """The diffused embedding table with its tied rounding head and nearest-embedding rounding.

    Rows are the model's vocabulary: `vocab_ids` (tokenizer ids, in row order), or the tokenizer's whole vocabulary
    when it is empty. Diffusion-LM builds its vocabulary from the training data (821 words on E2E), which keeps the
    rounding softmax small; `ids_to_rows` / `rows_to_ids` translate, and an id outside the vocabulary is an error."""

    def __init__(self, vocab_size: int, embed_dim: int, vocab_ids=()):
        super().__init__()
        listed = [int(i) for i in vocab_ids] or list(range(vocab_size))
        if min(listed) < 0 or max(listed) >= vocab_size or len(set(listed)) != len(listed):
            raise ConfigError(f"model.vocab_ids must be distinct token ids in 0..{vocab_size - 1} (model.vocab_size)")
        ids = torch.tensor(listed, dtype=torch.long)
        lookup = torch.full((vocab_size,), -1, dtype=torch.long)
        lookup[ids] = torch.arange(len(listed))
        self.register_buffer("row_ids", ids, persistent=False)  # rebuilt from the config, not stored
        self.register_buffer("lookup", lookup, persistent=False)
        self.weight = nn.Parameter(torch.randn(ids.numel(), embed_dim))  # N(0, 1), as nn.Embedding in Diffusion-LM

    def ids_to_rows(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self.lookup[ids]
        if bool((rows < 0).any()):
            bad = sorted(set(ids[rows < 0].tolist()))[:5]
            raise ConfigError(f"token ids {bad} of the data are not in the model's vocabulary: add them to "
                              "model.vocab_ids (or leave it empty for the whole tokenizer)")
        return rows

    def rows_to_ids(self, rows: torch.Tensor) -> torch.Tensor:
        return self.row_ids[rows]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(self.ids_to_rows(ids), self.weight)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """p(row | x) before the softmax: the LM head tied to the table (Diffusion-LM's get_logits)."""
        return x @ self.weight.t()

    def nearest(self, x: torch.Tensor) -> torch.Tensor:
        """Rows of the embeddings closest to x (..., D) in Euclidean distance (Diffusion-LM's clamping)."""
        flat = x.reshape(-1, x.shape[-1])
        dist = (flat * flat).sum(-1, keepdim=True) - 2 * flat @ self.weight.t() + (self.weight ** 2).sum(-1)[None]
        return dist.argmin(dim=-1).view(x.shape[:-1])


class CaptionDiT(nn.Module):
    """Denoiser over a caption's word embeddings, conditioned on an image prefix (see the module docstring)."""

    learn_sigma = False
    num_classes = 0  # no label table: the condition is the image prefix
    modality = "caption"

    def __init__(self, vocab_size=30522, vocab_ids=(), embed_dim=16, seq_len=16, feature_dim=64, prefix_len=4, mapping_depth=1,
                 hidden_size=128, depth=4, num_heads=4, mlp_ratio=4.0):
        super().__init__()
        if min(vocab_size, embed_dim, seq_len, feature_dim, prefix_len, hidden_size, depth) < 1:
            raise ConfigError("model sizes (vocab_size, embed_dim, seq_len, feature_dim, prefix_len, hidden_size, "
                              "depth) must all be >= 1")
        self.seq_len, self.embed_dim, self.prefix_len = seq_len, embed_dim, prefix_len
        self.hidden_size, self.num_heads, self.mlp_ratio = hidden_size, num_heads, mlp_ratio
        self.latent_shape = (seq_len, embed_dim)  # one model input: the caption's embeddings
        self.word_embedding = WordEmbedding(vocab_size, embed_dim, vocab_ids)
        self.mapping = MappingNetwork(feature_dim, hidden_size, prefix_len, mapping_depth, num_heads)
        self.input_proj = nn.Sequential(nn.Linear(embed_dim, hidden_size), nn.Tanh(), nn.Linear(hidden_size, hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, prefix_len + seq_len, hidden_size))
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.blocks = nn.ModuleList([DiTBlock(hidden_size, num_heads, mlp_ratio) for _ in range(depth)])
        self.final_layer = FinalLayer(hidden_size, 1, embed_dim)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        # DiT's initialisation for the transformer (xavier linears, N(0, 0.02) time MLP, adaLN-Zero, zero output);
        # the embedding table (not a Linear) keeps N(0, 1) and the positions get N(0, 0.02) (BERT's learned positions).
        xavier_init_linears(self)
        nn.init.normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for p in (self.final_layer.adaLN_modulation[-1].weight, self.final_layer.adaLN_modulation[-1].bias,
                  self.final_layer.linear.weight, self.final_layer.linear.bias):
            nn.init.zeros_(p)

    # -- what the objective and the sampler use ------------------------------------------------------------------
    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.word_embedding(ids)

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        return self.word_embedding.logits(x)

    def clamp(self, x: torch.Tensor) -> torch.Tensor:
        """x -> the nearest word embeddings (the clamping trick)."""
        return F.embedding(self.word_embedding.nearest(x), self.word_embedding.weight)

    def targets(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids -> the classes of `logits` (rows of the vocabulary)."""
        return self.word_embedding.ids_to_rows(ids)

    def round(self, x: torch.Tensor) -> torch.Tensor:
        """Final rounding: the tied head's most likely token at every position, as token ids."""
        return self.word_embedding.rows_to_ids(self.logits(x).argmax(dim=-1))

    def check_data(self, data_shape: tuple, num_classes: int) -> None:
        if tuple(data_shape) != (self.seq_len,):
            raise ConfigError(f"the data gives captions of {data_shape[0]} tokens but model.seq_len={self.seq_len}: "
                              f"set model.seq_len={data_shape[0]}")

    def forward(self, x: torch.Tensor, t: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """x (N, L, D) noisy embeddings; t (N,) model time; prefix (N, S, F) image feature tokens."""
        p = self.mapping(prefix)  # (N, P, H)
        h = torch.cat([p, self.input_proj(x)], dim=1) + self.pos_embed
        c = self.t_embedder(t)
        for block in self.blocks:
            h = block(h, c)
        return self.final_layer(h[:, self.prefix_len:], c)  # (N, L, D): predicted x0 of the words


@MODELS.register("caption-dit", config=CaptionDiTConfig,
                 help="Prefix-diffusion captioner: DiT over word embeddings with an image prefix (Diffusion-LM)")
def build_caption_dit(cfg) -> CaptionDiT:
    """Prefix-diffusion captioner: DiT over word embeddings with an image prefix (Diffusion-LM)."""
    return CaptionDiT(**section_kwargs(cfg, CaptionDiTConfig))
