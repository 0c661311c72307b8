"""The injection spec: one description of every attention-injection editor, compiled to `ditk.hooks.attach`.

A spec is a list of rules (a YAML file: `rules: [...]`, or the list itself). Each rule says

    blocks:   [2, 3] | "2:4" (half-open) | "all"       which blocks' self-attention
    tensor:   q | k | v | out | kv                     the hook point: blocks.<i>.attn.<tensor>_hook (kv: concat only)
    op:       replace | add | concat                   what to do with the injected feature S
    source:   inversion | source                       S comes from the inversion pass (captured at the same grid
                                                       evaluation) or from the live source branch of the same batch
    apply_to: target | source                          which branch's rows receive it (default target)
    steps:    [start, stop)                            sampling steps (default all); step 0 is the noisiest
    tokens:   [start, stop) | "all"                    token range (image tokens of a DiT: all)
    weight:   1.0                                      add: x + weight * S
    mask:     auto | image                             concat: which source tokens the target may attend to
    threshold: 1.0                                     concat auto mask: keep source tokens whose feature change is
                                                       below threshold x the mean change

replace sets the rows' feature to S, add adds weight * S; concat (K and V together) lets the target's queries attend
to [K_target; K_S] / [V_target; V_S], with logits of masked-out source tokens at -inf. `concat` is computed in the
out hook from the q, k, v recorded in the same forward (SDPA over the concatenated keys), so no model code changes.

Batch layout while editing: rows are [source branch (n images), target branch (n images)] (the source branch is
left out by editors that do not read it), and the loop appends the unconditional copy when guiding.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch
import torch.nn.functional as F

from ..errors import ConfigError

TENSORS = ("q", "k", "v", "out", "kv")
OPS = ("replace", "add", "concat")
SOURCES = ("inversion", "source")
BRANCHES = ("target", "source")
KEYS = ("blocks", "tensor", "op", "source", "apply_to", "steps", "tokens", "weight", "mask", "threshold")


@dataclass
class Rule:
    blocks: list
    tensor: str
    op: str = "replace"
    source: str = "inversion"
    apply_to: str = "target"
    steps: Optional[tuple] = None  # [start, stop) sampling steps; None = all
    tokens: Optional[tuple] = None  # [start, stop) tokens; None = all
    weight: float = 1.0
    mask: str = "auto"
    threshold: float = 1.0

    def active(self, step: int) -> bool:
        return self.steps is None or self.steps[0] <= step < self.steps[1]

    def points(self) -> list[str]:
        names = ("q", "k", "v", "out") if self.op == "concat" else (self.tensor,)
        return [f"blocks.{b}.attn.{t}_hook" for b in self.blocks for t in names]


def _range(value, what: str, limit: Optional[int] = None) -> Optional[tuple]:
    if value is None or value == "all":
        return None
    if isinstance(value, str) and ":" in value:
        lo, hi = value.split(":")
        value = [int(lo or 0), int(hi) if hi else limit]
    if not (isinstance(value, (list, tuple)) and len(value) == 2):
        raise ConfigError(f"spec {what} must be [start, stop), 'start:stop' or 'all', got {value!r}")
    lo, hi = int(value[0]), int(value[1]) if value[1] is not None else limit
    if hi is None or lo < 0 or hi < lo:
        raise ConfigError(f"spec {what} [{value[0]}, {value[1]}) is not a valid range")
    return (lo, hi)


def parse_rules(rules, depth: int) -> list[Rule]:
    """Validate a list of rule dicts against a model with `depth` blocks (ConfigError names the problem)."""
    if isinstance(rules, dict):
        rules = rules.get("rules", None)
    if not isinstance(rules, list) or not rules:
        raise ConfigError("an injection spec is a non-empty list of rules (YAML: `rules: [{blocks: ..., tensor: ...}]`)")
    out = []
    for n, r in enumerate(rules):
        if not isinstance(r, dict):
            raise ConfigError(f"spec rule {n} is not a mapping")
        unknown = sorted(set(r) - set(KEYS))
        if unknown:
            raise ConfigError(f"spec rule {n}: unknown key(s) {', '.join(unknown)}: use {', '.join(KEYS)}")
        b = r.get("blocks", "all")
        if b == "all":
            blocks = list(range(depth))
        elif isinstance(b, str) and ":" in b:
            lo, hi = _range(b, "blocks", depth)
            blocks = list(range(lo, hi))
        elif isinstance(b, int):
            blocks = [b]
        elif isinstance(b, (list, tuple)):
            blocks = [int(x) for x in b]
        else:
            raise ConfigError(f"spec rule {n}: blocks must be a list, 'a:b' or 'all', got {b!r}")
        bad = [x for x in blocks if not 0 <= x < depth]
        if bad or not blocks:
            raise ConfigError(f"spec rule {n} names block {bad[0] if bad else '(none)'} but the model has {depth} "
                              f"blocks (0..{depth - 1}): fix its blocks")
        tensor, op = r.get("tensor"), r.get("op", "replace")
        if tensor not in TENSORS:
            raise ConfigError(f"spec rule {n}: tensor must be one of {', '.join(TENSORS)}, got {tensor!r}")
        if op not in OPS:
            raise ConfigError(f"spec rule {n}: op must be one of {', '.join(OPS)}, got {op!r}")
        if (op == "concat") != (tensor == "kv"):
            raise ConfigError(f"spec rule {n}: concat works on keys and values together: use tensor kv with op concat")
        source, apply_to = r.get("source", "inversion"), r.get("apply_to", "target")
        if source not in SOURCES:
            raise ConfigError(f"spec rule {n}: source must be one of {', '.join(SOURCES)}, got {source!r}")
        if apply_to not in BRANCHES:
            raise ConfigError(f"spec rule {n}: apply_to must be one of {', '.join(BRANCHES)}, got {apply_to!r}")
        if source == "source" and apply_to == "source":
            raise ConfigError(f"spec rule {n}: the source branch cannot receive its own features")
        mask = r.get("mask", "auto")
        if mask not in ("auto", "image"):
            raise ConfigError(f"spec rule {n}: mask must be auto or image, got {mask!r}")
        out.append(Rule(blocks=blocks, tensor=tensor, op=op, source=source, apply_to=apply_to,
                        steps=_range(r.get("steps"), "steps"), tokens=_range(r.get("tokens"), "tokens"),
                        weight=float(r.get("weight", 1.0)), mask=mask, threshold=float(r.get("threshold", 1.0))))
    return out


def load_spec(path: str, depth: int) -> list[Rule]:
    import yaml

    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"injection spec '{path}' does not exist: pass a YAML file with `rules: [...]`")
    try:
        data = yaml.safe_load(p.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"injection spec '{path}' is not valid YAML ({str(e).splitlines()[0]})") from None
    return parse_rules(data, depth)


def capture_points(rules: list[Rule]) -> list[str]:
    """Hook points whose inversion features the rules read."""
    pts = []
    for r in rules:
        if r.source == "inversion":
            names = ("k", "v", "out") if r.op == "concat" else (r.tensor,)
            pts += [f"blocks.{b}.attn.{t}_hook" for b in r.blocks for t in names]
    return sorted(set(pts))


def step_of_key(key, steps: int) -> int:
    """The sampling step (0 = noisiest) of a grid evaluation key."""
    if key[0] == "initial":  # FireFlow's extra first evaluation belongs to step 0
        return 0
    return steps - 1 - key[1] if key[0] == "interval" else steps - key[1]


@dataclass
class Layout:
    n: int  # images
    branches: tuple  # ("source", "target") or ("target",)

    def rows(self, branch: str, batch: int) -> torch.Tensor:
        """Row indices of `branch` in a batch of `batch` rows (chunks of n, branches cycling, cfg copies after)."""
        nb = len(self.branches)
        idx = [r for r in range(batch) if self.branches[(r // self.n) % nb] == branch]
        return torch.tensor(idx, dtype=torch.long)


class Injector:
    """Compiled rules: a step hook (tracks the evaluation key) plus one forward hook per hook point."""

    def __init__(self, model, rules: list[Rule], layout: Layout, steps: int, store=None,
                 image_mask: Optional[torch.Tensor] = None):
        self.model, self.rules, self.layout, self.steps, self.store = model, rules, layout, steps, store
        self.image_mask = image_mask  # (n, T) in {0, 1}: 1 = a source token the target may attend to
        self._grid = None
        self.key, self.step = None, None
        self._qkv: dict = {}
        self.mask_fraction: list[float] = []
        for r in rules:
            if r.source == "source" and "source" not in layout.branches:
                raise ConfigError("a rule reads the live source branch but the batch has none")
            if r.op == "concat" and r.mask == "image" and image_mask is None:
                raise ConfigError("a concat rule with mask: image needs --mask IMAGE")

    # step hook
    def begin(self, scheduler):
        self._grid = scheduler

    def step_begin(self, i, t, x):
        self.key = self._grid.eval_key(i)
        self.step = step_of_key(self.key, self.steps)

    # forward hooks
    def _feature(self, rule: Rule, point: str, output: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """The injected feature S for the given receiving rows."""
        n = self.layout.n
        if rule.source == "inversion":
            cached = self.store.get(self.key, point).to(output.device, output.dtype)
            return cached[rows % n]
        return output[rows - n]  # the source branch's row of the same image (same cfg copy): chunk before

    def _point_fn(self, point: str, rules: list[Rule]):
        block_attn = point.rsplit(".", 1)[0]
        tensor = point.rsplit(".", 1)[1][: -len("_hook")]

        def fn(module, inputs, output):
            live = [r for r in rules if r.active(self.step)]
            if self.key[0] == "initial":  # nothing was captured there: only live-branch rules apply
                live = [r for r in live if r.source == "source"]
            concat = [r for r in live if r.op == "concat"]
            result = output
            for r in live:
                if r.op == "concat":
                    if tensor == "out":
                        result = self._concat(r, block_attn, result)
                    continue
                rows = self.layout.rows(r.apply_to, output.shape[0]).to(output.device)
                s = self._feature(r, point, output, rows)
                tok = slice(None) if r.tokens is None else slice(*r.tokens)
                result = result.clone() if result is output else result
                if r.op == "replace":
                    result[rows, ..., tok, :] = s[..., tok, :]
                else:
                    result[rows, ..., tok, :] = result[rows, ..., tok, :] + r.weight * s[..., tok, :]
            if concat and tensor in ("q", "k", "v"):  # after the other rules: the source's K/V as injected
                self._qkv.setdefault(block_attn, {})[tensor] = result
            return result

        return fn

    def _concat(self, rule: Rule, block_attn: str, out: torch.Tensor) -> torch.Tensor:
        """Attention of the receiving rows over [own K; source K] and [own V; source V] (source tokens masked)."""
        rec = self._qkv.pop(block_attn)
        q, k, v = rec["q"], rec["k"], rec["v"]  # (B, H, T, d)
        rows = self.layout.rows(rule.apply_to, q.shape[0]).to(q.device)
        n = self.layout.n
        if rule.source == "inversion":
            ks = self.store.get(self.key, f"{block_attn}.k_hook").to(q)[rows % n]
            vs = self.store.get(self.key, f"{block_attn}.v_hook").to(q)[rows % n]
            out_s = self.store.get(self.key, f"{block_attn}.out_hook").to(q)[rows % n]
        else:
            ks, vs, out_s = k[rows - n], v[rows - n], out[rows - n]
        T = k.shape[2]
        if rule.mask == "image":
            keep = self.image_mask.to(q.device)[rows % n].bool()  # (R, T)
        else:
            # TIC's mask guidance, our reading: source tokens where the naive edit's attention output differs
            # little from the source's are the content to keep; the changed ones are masked out.
            diff = (out[rows] - out_s).norm(dim=-1)  # (R, T)
            keep = diff <= rule.threshold * diff.mean(dim=1, keepdim=True)
        tok = torch.zeros(T, dtype=torch.bool, device=q.device)
        tok[slice(None) if rule.tokens is None else slice(*rule.tokens)] = True
        keep = keep & tok[None]
        self.mask_fraction.append(float(keep.float().mean()))
        bias = torch.zeros(len(rows), 1, 1, 2 * T, dtype=q.dtype, device=q.device)
        bias[:, 0, 0, T:] = torch.where(keep, 0.0, -math.inf)
        attn = F.scaled_dot_product_attention(q[rows], torch.cat([k[rows], ks], dim=2), torch.cat([v[rows], vs], dim=2),
                                              attn_mask=bias)
        result = out.clone()
        result[rows] = attn.transpose(1, 2).reshape(len(rows), T, -1)
        return result

    def hook_fns(self) -> dict:
        by_point: dict = {}
        for r in self.rules:
            for p in r.points():
                by_point.setdefault(p, []).append(r)
        return {p: self._point_fn(p, rs) for p, rs in by_point.items()}


def token_mask_from_image(mask: torch.Tensor, grid: int) -> torch.Tensor:
    """(n, 1, H, W) edit mask in [0, 1] (1 = region to edit) -> (n, grid*grid) tokens the target may copy from
    the source (those whose patch is mostly outside the edit region)."""
    pooled = F.adaptive_avg_pool2d(mask.float(), grid)  # (n, 1, g, g), row-major like PatchEmbed
    return (pooled.flatten(1) < 0.5).float()
