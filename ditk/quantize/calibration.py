"""Calibration set over the sampling trajectory, and observers that collect layer inputs from it.

The set is what the full-precision model sees while sampling: `num` images (classes uniform, seed `seed`, the
run's own solver, steps and guidance) and, at `timesteps` evenly spaced steps of the trajectory, the model's
inputs (x_t, t, labels; the [cond; uncond] batch when guidance is on). This is the calibration data of PTQ4DiT
(`get_calibration_set.py`: 25 timesteps x 64 samples) and Q-DiT (`collect_cali_data.py`), drawn through
ditk's one sampling loop with a forward pre-hook on the model.

It is cached on disk ($DITK_CACHE_DIR/quant-calib, default ~/.cache/ditk/quant-calib) under a key of the source
weights and these settings (settings.json beside the tensors), so every scheme and method reuses it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import torch
from safetensors.torch import load_file, save_file

from ..atomic import atomic_dir
from .checks import CalibSettings


def cache_root() -> Path:
    return Path(os.environ.get("DITK_CACHE_DIR", Path.home() / ".cache" / "ditk")) / "quant-calib"


def _weights_fingerprint(pipe) -> str:
    """The source weights' identity: file path, size and modification time of the loaded checkpoint."""
    from ..runs import resolve_checkpoint

    if pipe.run_dir is not None:
        _, ckpt = resolve_checkpoint(pipe.run_dir)
        files = sorted(ckpt.glob("*.safetensors"))
    else:
        files = []
    return json.dumps([[str(f.resolve()), f.stat().st_size, f.stat().st_mtime_ns] for f in files] + [pipe.source])


def calibration_set(pipe, settings: CalibSettings, progress: bool = True) -> tuple[dict, dict]:
    """(inputs {"x", "t", <model kwargs>}: tensors with M = timesteps x batch rows, description for quantization.json)."""
    from omegaconf import OmegaConf

    settings.check()
    sc = OmegaConf.to_container(pipe.cfg.sample, resolve=True)
    sampling = {k: sc[k] for k in ("solver", "steps", "cfg_scale", "cfg_channels", "solver_options")}
    key_data = {"weights": _weights_fingerprint(pipe), "settings": asdict(settings), "sampling": sampling}
    key = hashlib.sha256(json.dumps(key_data, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_root() / key
    describe = {**asdict(settings), **sampling, "classes": "uniform", "cache": str(folder)}
    if (folder / "inputs.safetensors").is_file():
        print(f"[ditk] calibration set: reusing {folder}", file=sys.stderr)
        meta = json.loads((folder / "settings.json").read_text())
        return load_file(str(folder / "inputs.safetensors")), {**describe, "seconds": meta["seconds"], "reused": True}
    start = time.perf_counter()
    inputs = _record(pipe, settings, sampling["steps"], progress)
    seconds = round(time.perf_counter() - start, 3)
    with atomic_dir(folder) as tmp:
        save_file({k: v.contiguous() for k, v in inputs.items()}, str(tmp / "inputs.safetensors"))
        (tmp / "settings.json").write_text(json.dumps({**key_data, "seconds": seconds}, indent=2) + "\n")
    print(f"[ditk] calibration set: {len(inputs['x'])} model inputs in {seconds:.1f}s -> {folder}", file=sys.stderr)
    return inputs, {**describe, "seconds": seconds, "reused": False}


def _record(pipe, settings: CalibSettings, steps: int, progress: bool) -> dict:
    from omegaconf import OmegaConf

    from ..generate import sample_images

    keep = {round(i * (steps - 1) / max(settings.timesteps - 1, 1)) for i in range(settings.timesteps)}
    rows: list[dict] = []
    calls = {"n": 0}

    def hook(module, args, kwargs):
        step = calls["n"] % steps  # call n of a batch is step n of its trajectory (one call per step)
        calls["n"] += 1
        if step in keep:
            rows.append({"x": args[0].detach().cpu(), "t": args[1].detach().cpu(),
                         **{k: v.detach().cpu() for k, v in kwargs.items() if isinstance(v, torch.Tensor)}})

    saved = pipe.cfg.sample
    pipe.cfg.sample = OmegaConf.merge(saved, {"seed": settings.seed, "class_labels": "uniform", "cache": "none"})
    handle = pipe.model.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for b in range(0, settings.num, settings.batch_size):
            calls["n"] = 0
            sample_images(pipe, list(range(b, min(b + settings.batch_size, settings.num))), progress=progress)
    finally:
        handle.remove()
        pipe.cfg.sample = saved
    return {k: torch.cat([r[k] for r in rows]) for k in rows[0]}


def batches(inputs: dict, batch_size: int = 256) -> Iterator[dict]:
    n = len(inputs["x"])
    for b in range(0, n, batch_size):
        yield {k: v[b:b + batch_size] for k, v in inputs.items()}


def run_model(model, inputs: dict, batch_size: int = 256) -> torch.Tensor:
    """The model's outputs on the calibration inputs (concatenated over batches)."""
    device = next(model.parameters()).device
    outs = []
    with torch.no_grad():
        for batch in batches(inputs, batch_size):
            batch = {k: v.to(device) for k, v in batch.items()}
            x, t = batch.pop("x"), batch.pop("t")
            outs.append(model(x, t, **batch).float().cpu())
    return torch.cat(outs)


@contextlib.contextmanager
def observe(model, names: list[str], fn) -> Iterator[None]:
    """Call fn(name, x) with the input x of every layer in `names` at each forward (hook observers)."""
    handles = [model.get_submodule(n).register_forward_pre_hook(lambda m, a, n=n: fn(n, a[0].detach())) for n in names]
    try:
        yield
    finally:
        for h in handles:
            h.remove()
