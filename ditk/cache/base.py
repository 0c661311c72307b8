"""The machinery every cache policy shares: a per-sampling-call session, forward patching, NFE counting.

A policy never edits model code. For the duration of one sampling call (`policy.session(model, num_evals)`)
it replaces the `forward` of some modules of `model.blocks` (whole blocks, or their attention / MLP
sub-modules) by a function that either runs the original forward or returns a cached / predicted value;
leaving the session restores every forward. The session keys everything on the index of the model
evaluation within the call (0, 1, ..., num_evals - 1): for one-call-per-step solvers that is the step
index; Heun's second evaluation of a step is an evaluation of its own.

Classifier-free guidance: the sampler evaluates [cond; uncond] as one doubled batch. Every DiT operation
(attention, LayerNorm, the adaLN MLPs) acts on each batch row separately, so a cache that holds the doubled
batch's tensors holds each branch's own values: the static policies (FORA, TaylorSeer, Delta-DiT), whose
decision depends only on the step, cache the doubled batch as a whole and are exactly per-branch. The
dynamic policies (FirstBlockCache, TeaCache) compare a statistic with a threshold; a batch-mean statistic
would mix cond and uncond (and an image with its batch-mates, so image i would depend on the batch size).
They therefore decide per row: every (image, CFG branch) row has its own accumulator and cached residual,
and only the rows that must be recomputed run through the remaining blocks.

Counts: every model evaluation of every row adds one to the `computed` or `cached` count of each hooked
unit; the report divides by the number of rows, so its numbers are per sampling trajectory (one image's
conditional, or unconditional, pass).
"""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Any, Callable, Iterator, Optional

import torch
import torch.nn as nn

from ..errors import ConfigError

Forward = Callable[..., Any]


class CacheStats:
    """Evaluation and per-unit compute counts, accumulated over the sampling calls of one policy object."""

    def __init__(self):
        self.rows = 0  # trajectories: batch rows summed over sampling calls (a CFG batch counts both halves)
        self.calls = 0
        self.evals = 0  # row-evaluations of the model
        self.full = 0  # row-evaluations in which no hooked unit was cached
        self.units: dict[str, list] = {}  # unit -> [computed, cached] row-evaluations (ints or device tensors)

    def add(self, unit: str, computed, cached) -> None:
        counts = self.units.setdefault(unit, [0, 0])
        counts[0] = counts[0] + computed
        counts[1] = counts[1] + cached

    def report(self) -> dict:
        per = (lambda v: round(float(v) / self.rows, 4)) if self.rows else (lambda v: 0.0)
        return {
            "trajectories": self.rows,
            "sampling_calls": self.calls,
            "model_evaluations": per(self.evals),
            "full_evaluations": per(self.full),
            "partial_evaluations": per(self.evals - self.full),
            "units": {name: {"computed": per(c), "cached": per(k)} for name, (c, k) in self.units.items()},
        }


class Session:
    """State of one sampling call: the evaluation index, the batch rows, and the policy's own state."""

    def __init__(self, policy: "CachePolicy", model: nn.Module, num_evals: int):
        self.policy = policy
        self.model = model
        self.num_evals = int(num_evals)
        self.step = -1  # index of the model evaluation in progress
        self.rows = None  # batch rows of this call (fixed for the whole call)
        self.state: dict[str, Any] = {}  # the policy's per-call state
        self._cached_rows = None  # rows with at least one cached unit in the current evaluation
        self._patched: list[tuple[nn.Module, bool, Any]] = []

    # -- bookkeeping -----------------------------------------------------------------------------------------

    def mark(self, unit: str, cached) -> None:
        """Count one evaluation of `unit` for every row: `cached` is a bool (all rows) or a (rows,) bool mask."""
        stats = self.policy.stats
        if isinstance(cached, torch.Tensor):
            n_cached = cached.sum()
            stats.add(unit, self.rows - n_cached, n_cached)
            self._cached_rows = cached if self._cached_rows is None else (self._cached_rows | cached)
        elif cached:
            stats.add(unit, 0, self.rows)
            self._cached_rows = True
        else:
            stats.add(unit, self.rows, 0)

    def _begin(self, module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        if self.rows is None:
            self.rows = int(x.shape[0])
        elif int(x.shape[0]) != self.rows:
            raise ValueError(f"the batch changed from {self.rows} to {x.shape[0]} rows within one sampling call")
        self.step += 1
        if self.step >= self.num_evals:
            raise ValueError(f"the sampler evaluated the model more than the {self.num_evals} times it announced")
        self._cached_rows = None
        self.policy.begin_eval(self)

    def _end(self, module, args, kwargs, output):
        stats = self.policy.stats
        stats.evals += self.rows
        if self._cached_rows is None:
            stats.full += self.rows
        elif isinstance(self._cached_rows, torch.Tensor):
            stats.full = stats.full + (self.rows - self._cached_rows.sum())
        self.policy.end_eval(self, output)

    # -- patching --------------------------------------------------------------------------------------------

    def patch(self, module: nn.Module, forward: Forward) -> None:
        """Make `forward` the module's forward until the session ends (an instance attribute shadows the
        class method; whatever instance-level forward was there, e.g. a compiled one, comes back after)."""
        had = "forward" in module.__dict__
        self._patched.append((module, had, module.__dict__.get("forward")))
        module.forward = forward

    def _unpatch(self) -> None:
        for module, had, previous in reversed(self._patched):
            if had:
                module.forward = previous
            else:
                del module.forward
        self._patched.clear()


class CachePolicy:
    """Base class: a named, configured policy; `session()` applies it to one sampling call."""

    name = ""

    def __init__(self, cfg=None):
        self.cfg = cfg
        self.stats = CacheStats()

    # -- what a policy implements ----------------------------------------------------------------------------

    def units(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The modules whose forward the policy replaces (named like `model.named_modules()`)."""
        raise NotImplementedError

    def install(self, session: Session, units: list[tuple[str, nn.Module]]) -> None:
        """Patch the units' forwards for this session (`session.patch`)."""
        raise NotImplementedError

    def begin_eval(self, session: Session) -> None:
        """Called before every model evaluation (session.step is already its index)."""

    def end_eval(self, session: Session, output) -> None:
        """Called after every model evaluation with the model's output."""

    def validate(self, model: nn.Module, num_evals: int) -> None:
        """Raise ConfigError when the options cannot work for this model / number of evaluations."""

    # -- shared ------------------------------------------------------------------------------------------------

    def settings(self) -> dict:
        options = dataclasses.asdict(self.cfg) if dataclasses.is_dataclass(self.cfg) else dict(self.cfg or {})
        return {"policy": self.name, "options": options}

    def report(self) -> dict:
        return {**self.settings(), **self.stats.report()}

    @contextlib.contextmanager
    def session(self, model: nn.Module, num_evals: int) -> Iterator[Session]:
        """Apply the policy to the model evaluations of one sampling call (fresh state, restored on exit)."""
        units = self.units(model)
        if not units:
            raise ConfigError(
                f"cache policy '{self.name}' hooked nothing in {type(model).__name__}: it needs the model's "
                f"`blocks` (and attention/MLP sub-modules); use --cache none for this model"
            )
        self.validate(model, num_evals)
        session = Session(self, model, num_evals)
        handles = [
            model.register_forward_pre_hook(session._begin, with_kwargs=True),
            model.register_forward_hook(session._end, with_kwargs=True),
        ]
        try:
            self.install(session, units)
            self.stats.calls += 1
            yield session
            if session.rows is not None:
                self.stats.rows += session.rows
        finally:
            session._unpatch()
            for handle in handles:
                handle.remove()


class NoCache(CachePolicy):
    """`--cache none`: patches nothing; counts the evaluations so every report has the same NFE section."""

    name = "none"

    def units(self, model):
        return [(f"blocks.{i}", block) for i, block in enumerate(model_blocks(model))] or [("model", model)]

    def install(self, session, units):
        session.state["units"] = [name for name, _ in units]

    def begin_eval(self, session):
        for name in session.state["units"]:
            session.mark(name, False)

    def settings(self):
        return {"policy": "none", "options": {}}


# -- helpers shared by the policies ---------------------------------------------------------------------------


def model_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's ordered blocks, or [] when it has no `blocks` ModuleList."""
    found = getattr(model, "blocks", None)
    return list(found) if isinstance(found, nn.ModuleList) else []


def rows_of(value, mask: torch.Tensor, n: int):
    """Select the masked rows of every tensor argument whose first dimension is the batch (n rows)."""
    if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape[0] == n:
        return value[mask]
    return value


def masked_forward(forward: Forward, mask: Optional[torch.Tensor], all_rows: bool, no_rows: bool, x: torch.Tensor,
                   args: tuple, kwargs: dict) -> torch.Tensor:
    """Run a block only on the rows in `mask`; the other rows pass through unchanged.

    all_rows / no_rows are mask.all() / not mask.any(), computed once per evaluation by the policy (they
    need a device sync)."""
    if all_rows:
        return forward(x, *args, **kwargs)
    if no_rows:
        return x
    n = x.shape[0]
    out = x.clone()
    out[mask] = forward(x[mask], *(rows_of(a, mask, n) for a in args),
                        **{k: rows_of(v, mask, n) for k, v in kwargs.items()})
    return out


def relative_l1(now: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """Per-row mean |now - before| / mean |before|; inf where `before` is all zeros (no scale to compare with)."""
    dims = tuple(range(1, now.dim()))
    num = (now - before).abs().float().mean(dim=dims)
    den = before.abs().float().mean(dim=dims)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float32).tiny), torch.full_like(num, float("inf")))


def check_block_output(out, x: torch.Tensor, policy: str, unit: str) -> None:
    """Block-level policies add and subtract block outputs: they need a block that maps a tensor to a tensor
    of the same shape (DiT, RWKV); Mamba-style blocks return (hidden, residual) pairs."""
    if not isinstance(out, torch.Tensor) or out.shape != x.shape:
        got = type(out).__name__ if not isinstance(out, torch.Tensor) else f"shape {tuple(out.shape)}"
        raise ConfigError(f"cache policy '{policy}' replaces whole blocks, but {unit} returns {got} for an input of "
                          f"shape {tuple(x.shape)}: use --cache fora or --cache taylorseer for this model")
