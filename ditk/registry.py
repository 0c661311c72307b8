"""Name -> constructor tables. A new model, objective, dataset, ... is one `@REGISTRY.register(...)`.

Registries import the modules that fill them lazily, on first lookup, so `ditk --help` never pays for
torch. Each entry may declare a config dataclass: the config section that selects the entry (e.g.
`model: {name: dit, depth: 12, ...}`) is validated against it (see `ditk.config`).
"""

from __future__ import annotations

import difflib
import importlib
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Optional

from .errors import ConfigError


@dataclass(frozen=True)
class Entry:
    name: str
    builder: Callable[..., Any]
    config: Optional[type]  # dataclass describing the entry's config section (without `name`)
    help: str


class Registry:
    def __init__(self, kind: str, modules: list[str]):
        self.kind = kind
        self._modules = list(modules)  # imported on first lookup; they register their entries
        self._entries: dict[str, Entry] = {}
        self._loaded = False

    def register(self, name: str, config: Optional[type] = None, help: str = ""):
        def decorator(builder):
            if name in self._entries and self._entries[name].builder is not builder:
                raise ValueError(f"{self.kind} '{name}' is registered twice")
            doc = help or (builder.__doc__ or "").strip().split("\n")[0]
            self._entries[name] = Entry(name, builder, config, doc)
            return builder

        return decorator

    def _load(self) -> None:
        if not self._loaded:
            self._loaded = True
            for module in self._modules:
                if module.endswith(".*"):  # every module of a package: dropping a file in registers it
                    package = importlib.import_module(module[:-2])
                    for info in pkgutil.iter_modules(package.__path__):
                        if not info.name.startswith("_"):
                            importlib.import_module(f"{package.__name__}.{info.name}")
                else:
                    importlib.import_module(module)

    def names(self) -> list[str]:
        self._load()
        return sorted(self._entries)

    def get(self, name: str) -> Entry:
        self._load()
        if name not in self._entries:
            close = difflib.get_close_matches(str(name), self._entries, n=1)
            hint = f"did you mean '{close[0]}'?" if close else f"choose one of: {', '.join(self.names())}"
            raise ConfigError(f"unknown {self.kind} '{name}': {hint}")
        return self._entries[name]

    def build(self, name: str, *args, **kwargs):
        return self.get(name).builder(*args, **kwargs)

    def __contains__(self, name: str) -> bool:
        self._load()
        return name in self._entries


MODELS = Registry("model", ["ditk.models.*"])
OBJECTIVES = Registry("objective", ["ditk.objectives.*"])
SOLVERS = Registry("solver", ["ditk.sampling"])
DATASETS = Registry("dataset", ["ditk.data.*"])
AUTOENCODERS = Registry("autoencoder", ["ditk.autoencoders", "ditk.audio.vae"])
CONDITIONERS = Registry("conditioner", ["ditk.conditioners", "ditk.caption.encoders"])
FEATURE_EXTRACTORS = Registry("feature extractor", ["ditk.metrics.extractors", "ditk.metrics.photos_extractor"])

CACHE_POLICIES = Registry("cache policy", ["ditk.cache.*"])
DISTILL_METHODS = Registry("distillation method", ["ditk.distill.*"])
QUANT_SCHEMES = Registry("quantization scheme", ["ditk.quantize.real"])
PTQ_METHODS = Registry("simulated PTQ method", ["ditk.quantize.methods.*"])
