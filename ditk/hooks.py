"""Read or replace intermediate values of a model with standard torch forward hooks.

Every ditk backbone exposes `model.blocks` (in depth order) and, inside each attention, identity
`HookPoint` modules (`q_hook`, `k_hook`, `v_hook`, `out_hook`). Caching, editing, pruning and quantisation
attach functions to these by module name:

    with attach(model, {"blocks.3.attn.v_hook": lambda module, inputs, output: torch.zeros_like(output)}):
        out = model(x, t, y)

A function returns a replacement for the module's output, or None to leave it unchanged (torch's
forward-hook contract). Any module name works, e.g. "blocks.5" for a block's output; shell-style patterns
("blocks.*.attn.out_hook") select several modules at once.
"""

from __future__ import annotations

import contextlib
import fnmatch
from typing import Callable, Iterator, Mapping

import torch.nn as nn

from .errors import ConfigError
from .models.layers import HookPoint

HookFn = Callable[[nn.Module, tuple, object], object]


def hook_points(model: nn.Module) -> list[str]:
    """Names of all HookPoint modules, in forward (registration) order: blocks.0.attn.q_hook, ..."""
    return [name for name, module in model.named_modules() if isinstance(module, HookPoint)]


def blocks(model: nn.Module) -> list[nn.Module]:
    """The model's blocks in depth order (the `blocks` ModuleList every ditk backbone has)."""
    found = getattr(model, "blocks", None)
    if not isinstance(found, nn.ModuleList):
        raise ConfigError(f"{type(model).__name__} has no `blocks` ModuleList: hooks need a ditk backbone")
    return list(found)


def resolve(model: nn.Module, pattern: str) -> list[tuple[str, nn.Module]]:
    """(name, module) pairs whose name equals `pattern` or matches it as a shell-style pattern, in model order."""
    modules = dict(model.named_modules())
    if pattern in modules:
        return [(pattern, modules[pattern])]
    matched = [(name, module) for name, module in modules.items() if name and fnmatch.fnmatchcase(name, pattern)]
    if not matched:
        points = hook_points(model)
        example = f" (hook points look like '{points[0]}')" if points else ""
        raise ConfigError(
            f"no module of {type(model).__name__} matches '{pattern}'{example}: see ditk.hooks.hook_points"
        )
    return matched


@contextlib.contextmanager
def attach(model: nn.Module, fns: Mapping[str, HookFn]) -> Iterator[list[str]]:
    """Register fn(module, inputs, output) -> replacement | None as forward hooks; remove them all on exit.

    Every name (or pattern) must match at least one module, otherwise ConfigError is raised and nothing
    stays attached. Yields the list of module names that were hooked.
    """
    targets = [(name, module, fn) for pattern, fn in fns.items() for name, module in resolve(model, pattern)]
    handles = []
    try:
        for _, module, fn in targets:
            handles.append(module.register_forward_hook(fn))
        yield [name for name, _, _ in targets]
    finally:
        for handle in handles:
            handle.remove()
