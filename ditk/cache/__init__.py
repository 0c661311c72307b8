"""Training-free feature caching for diffusion transformers (FORA, TaylorSeer, Delta-DiT, FirstBlockCache, TeaCache).

    policy = build_policy("fora", {"interval": 3})
    x0 = ditk.sampling.sample(model, objective, noise, cond, uncond, ..., cache=policy)
    policy.report()  # NFE per block (computed vs cached), per sampling trajectory

Policies are CACHE_POLICIES entries (one module each); `base` holds the session / patching machinery and
`adapters` what a policy needs to know about a backbone's block class.
"""

from __future__ import annotations

import dataclasses
import difflib
from typing import Any, Mapping, Optional


def policy_names() -> list[str]:
    from ..registry import CACHE_POLICIES

    return ["none", *CACHE_POLICIES.names()]


def build_policy(name: str, options: Optional[Mapping[str, Any]] = None):
    """A fresh policy object (its counts start at zero). `none` counts evaluations and caches nothing."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    from ..errors import ConfigError
    from ..registry import CACHE_POLICIES
    from .base import NoCache

    options = dict(options or {})
    if name in ("none", None, ""):
        if options:
            raise ConfigError(f"cache options {sorted(options)} were given without a cache policy: add --cache NAME")
        return NoCache()
    entry = CACHE_POLICIES.get(str(name))
    fields = [f.name for f in dataclasses.fields(entry.config)]
    for key in options:
        if key not in fields:
            close = difflib.get_close_matches(str(key), fields, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"options of {name}: {', '.join(fields)}"
            raise ConfigError(f"unknown option '{key}' for cache policy '{name}': {hint}")
    try:
        cfg = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(entry.config), options))
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad value for cache option '{getattr(e, 'full_key', '') or name}': {str(e).splitlines()[0]}") from None
    return entry.builder(cfg)
