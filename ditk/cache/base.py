"""The machinery every cache policy shares: a per-sampling-call session, forward patching, NFE counting.

A policy never edits model code. For the duration of one sampling call (`policy.session(model, num_evals)`)
it replaces the `forward` of some modules of `model.blocks` (whole blocks, or their attention / MLP
sub-modules) by a function that either runs the original forward or returns a cached / predicted value;
leaving the session restores every forward. The session keys everything on the index of the model
evaluation within the call (0, 1, ..., num_evals - 1): for one-call-per-step solvers that is the step
index; Heun's second evaluation of a step is an evaluation of its own. A wrapper that calls the model several
times per evaluation (long audio clips: groups of windows) gives each of those calls its own state (see
`Session`).

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

import abc
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
    """State of one sampling call: the evaluation index, the batch rows, and the policy's own state.

    A model evaluation normally calls the denoiser once. A wrapper that evaluates it in several parts per
    evaluation (ditk.audio.long.MultiDiffusion: groups of windows) names the wrapped model as its
    `cache_denoiser`; every call of the denoiser within an evaluation is then a *part* with its own rows and its
    own policy state (part k of every evaluation is the same rows: the same windows of the same samples), so
    each window of each CFG branch is cached on its own."""

    def __init__(self, policy: "CachePolicy", model: nn.Module, num_evals: int):
        self.policy = policy
        self.wrapper = model  # what the sampler calls once per evaluation
        self.model = denoiser_of(model)  # what owns the blocks (the same module unless a wrapper splits evaluations)
        self.num_evals = int(num_evals)
        self.step = -1  # index of the model evaluation in progress
        self.part = -1  # index of the denoiser call within the evaluation
        self.parts: list[dict] = []  # per part: {"rows": int, "state": the policy's state for these rows}
        self._cached_rows = None  # rows with at least one cached unit in the current part
        self._patched: list[tuple[Any, str, bool, Any]] = []

    @property
    def state(self) -> dict:
        return self.parts[self.part]["state"]

    @property
    def rows(self) -> int:
        return self.parts[self.part]["rows"]

    @property
    def total_rows(self) -> int:
        return sum(p["rows"] for p in self.parts)

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

    def _next_eval(self, module, args, kwargs):
        self.step += 1
        self.part = -1
        if self.step >= self.num_evals:
            raise ValueError(f"the sampler evaluated the model more than the {self.num_evals} times it announced")

    def _begin(self, module, args, kwargs):
        x = args[0] if args else next(iter(kwargs.values()))
        rows = int(x.shape[0])
        self.part += 1
        if self.part == len(self.parts):
            if self.step > 0:
                raise ValueError(f"evaluation {self.step} called the denoiser more often than evaluation 0")
            self.parts.append({"rows": rows, "state": {}})
            self.parts[-1]["state"] = self.policy.init_state(self)
        elif rows != self.rows:
            raise ValueError(f"the batch changed from {self.rows} to {rows} rows within one sampling call")
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

    def patch(self, module: nn.Module, forward: Forward, attr: str = "forward") -> None:
        """Make `forward` the module's `attr` (its forward, or a method the adapter names) until the session
        ends (an instance attribute shadows the class method; whatever instance-level function was there, e.g.
        a compiled forward, comes back after)."""
        had = attr in module.__dict__
        self._patched.append((module, attr, had, module.__dict__.get(attr)))
        setattr(module, attr, forward)

    def _unpatch(self) -> None:
        for module, attr, had, previous in reversed(self._patched):
            if had:
                setattr(module, attr, previous)
            else:
                delattr(module, attr)
        self._patched.clear()


class CachePolicy(abc.ABC):
    """Base class: a named, configured policy; `session()` applies it to one sampling call."""

    name = ""

    def __init__(self, cfg=None):
        self.cfg = cfg
        self.stats = CacheStats()

    # -- what a policy implements ----------------------------------------------------------------------------

    @abc.abstractmethod
    def units(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The modules whose forward the policy replaces (named like `model.named_modules()`)."""

    @abc.abstractmethod
    def install(self, session: Session, units: list[tuple[str, nn.Module]]) -> None:
        """Patch the units' forwards for this session (`session.patch`)."""

    def init_state(self, session: Session) -> dict:
        """The policy's fresh state for one part (the rows of one denoiser call) of a sampling call."""
        return {}

    def begin_eval(self, session: Session) -> None:
        """Called before every denoiser call (session.step is the evaluation's index, session.state the part's)."""

    def end_eval(self, session: Session, output) -> None:
        """Called after every denoiser call with its output."""

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
        denoiser = denoiser_of(model)
        units = self.units(denoiser)
        if not units:
            raise ConfigError(
                f"cache policy '{self.name}' hooked nothing in {type(denoiser).__name__}: it needs the model's "
                f"`blocks` (and attention/MLP sub-modules); use --cache none for this model"
            )
        self.validate(denoiser, num_evals)
        session = Session(self, model, num_evals)
        handles = [model.register_forward_pre_hook(session._next_eval, with_kwargs=True),  # first: step += 1
                   denoiser.register_forward_pre_hook(session._begin, with_kwargs=True),
                   denoiser.register_forward_hook(session._end, with_kwargs=True)]
        try:
            self.install(session, units)
            self.stats.calls += 1
            yield session
            self.stats.rows += session.total_rows
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
        session.names = [name for name, _ in units]

    def begin_eval(self, session):
        for name in session.names:
            session.mark(name, False)

    def settings(self):
        return {"policy": "none", "options": {}}


# -- helpers shared by the policies ---------------------------------------------------------------------------


def denoiser_of(model: nn.Module) -> nn.Module:
    """The module that owns the blocks: a wrapper's `cache_denoiser` (see Session), else the model itself."""
    inner = getattr(model, "cache_denoiser", None)
    return inner if isinstance(inner, nn.Module) else model


def model_blocks(model: nn.Module) -> list[nn.Module]:
    """The model's ordered blocks, or [] when it has no `blocks` ModuleList."""
    found = getattr(denoiser_of(model), "blocks", None)
    return list(found) if isinstance(found, nn.ModuleList) else []


def masked_forward(io, forward: Forward, st: dict, args: tuple, kwargs: dict):
    """Run a block only on the rows in st["mask"]; the other rows pass their input state through unchanged.

    io: the block's `adapters.BlockIO` (how its arguments and output carry the model state). st["all"] /
    st["none"] are mask.all() / not mask.any(), computed once per evaluation by the policy (a device sync)."""
    if st["all"]:
        return forward(*args, **kwargs)
    if st["none"]:
        return io.write(io.read_in(args, kwargs), args, kwargs)
    mask = st["mask"]
    sub_args, sub_kwargs = io.select(args, kwargs, mask)
    computed = io.read_out(forward(*sub_args, **sub_kwargs), sub_args, sub_kwargs)
    state = io.read_in(args, kwargs).clone()
    state[mask] = computed
    return io.write(state, args, kwargs)


def relative_l1(now: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """Per-row mean |now - before| / mean |before|; inf where `before` is all zeros (no scale to compare with)."""
    dims = tuple(range(1, now.dim()))
    num = (now - before).abs().float().mean(dim=dims)
    den = before.abs().float().mean(dim=dims)
    return torch.where(den > 0, num / den.clamp_min(torch.finfo(torch.float32).tiny), torch.full_like(num, float("inf")))
