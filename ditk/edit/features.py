"""Attention features captured per grid evaluation (the K/V an editor injects later), kept on the CPU.

`FeatureCapture` is a step hook of the sampling loop plus `ditk.hooks.attach` functions: `step_begin` sets the
key of the current evaluation (`grid.eval_key(i)`, equal for the inversion and the sampling evaluation of the
same interval), and each hooked point stores its output under (key, point name).
"""

from __future__ import annotations

import contextlib

import torch

from ..hooks import attach


class FeatureStore:
    """{(eval key, hook point name): tensor (N, ...)} on the CPU, with its size in bytes."""

    def __init__(self):
        self.data: dict = {}

    def put(self, key, point: str, value: torch.Tensor) -> None:
        self.data[(key, point)] = value.detach().to("cpu", copy=True)

    def get(self, key, point: str) -> torch.Tensor:
        try:
            return self.data[(key, point)]
        except KeyError:
            raise KeyError(f"no captured feature for {point} at evaluation {key}: capture and inject with the same "
                           f"inversion method and steps") from None

    @property
    def nbytes(self) -> int:
        return sum(v.numel() * v.element_size() for v in self.data.values())

    def __len__(self):
        return len(self.data)

    # flat tensors for a .safetensors artefact: "feat|<key as text>|<point>"
    def to_tensors(self, index: int | None = None) -> dict:
        out = {}
        for (key, point), value in self.data.items():
            name = "feat|" + ",".join(map(str, key)) + "|" + point
            out[name] = (value if index is None else value[index:index + 1]).contiguous()
        return out

    @classmethod
    def from_tensors(cls, tensors: dict) -> "FeatureStore":
        store = cls()
        for name, value in tensors.items():
            if not name.startswith("feat|"):
                continue
            _, key_text, point = name.split("|")
            parts = key_text.split(",")
            key = (parts[0], *map(int, parts[1:]))
            store.data[(key, point)] = value
        return store

    @classmethod
    def concat(cls, stores: list["FeatureStore"]) -> "FeatureStore":
        """Stores of single images -> one store over the batch, in order."""
        out = cls()
        for k in stores[0].data:
            out.data[k] = torch.cat([s.data[k] for s in stores], dim=0)
        return out


class FeatureCapture:
    """Step hook + forward hooks that record `points` (hook point names) at every evaluation into `store`."""

    def __init__(self, model, points: list[str], store: FeatureStore | None = None):
        self.model, self.points = model, list(points)
        self.store = store if store is not None else FeatureStore()
        self._key = None
        self._grid = None

    def begin(self, scheduler):
        self._grid = scheduler

    def step_begin(self, i, t, x):
        self._key = self._grid.eval_key(i)

    def _recorder(self, point):
        def fn(module, inputs, output):
            self.store.put(self._key, point, output)
        return fn

    @contextlib.contextmanager
    def attached(self):
        with attach(self.model, {p: self._recorder(p) for p in self.points}):
            yield self
