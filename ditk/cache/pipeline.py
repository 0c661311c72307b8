"""The cache layer's side of `ditk sample`: the policy of a pipeline, compilation of the units it runs,
TeaCache calibration (`--calibrate`) and the comparison with full compute (`--compare-to-full`)."""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import numpy as np
import torch

from ..errors import ConfigError
from . import build_policy
from .adapters import patch_target
from .base import CacheStats, NoCache, denoiser_of

TEACACHE_FILE = "teacache.json"  # in the run directory, written by --calibrate


# -- the policy of a pipeline ---------------------------------------------------------------------------------


def policy_for(pipe):
    """The pipeline's cache policy, built once from `sample.cache` / `sample.cache_options`. For TeaCache
    without explicit coefficients, a run's calibration file supplies them (and is recorded in the options,
    so images made with other coefficients are never mixed into the same output folder)."""
    if getattr(pipe, "policy", None) is None:
        sc = pipe.cfg.sample
        options = dict(_plain(sc.cache_options))
        if sc.cache == "teacache" and "coefficients" not in options:
            stored = _stored_coefficients(pipe)
            if stored is not None:
                options["coefficients"] = stored
                _set_option(pipe, "coefficients", stored)
        pipe.policy = build_policy(sc.cache, options)
    return pipe.policy


def reset_counts(policy) -> None:
    policy.stats = CacheStats()


def _stored_coefficients(pipe) -> Optional[list]:
    run_dir = getattr(pipe, "run_dir", None)
    path = Path(run_dir) / TEACACHE_FILE if run_dir else None
    if path is None or not path.is_file():
        return None
    return [float(c) for c in json.loads(path.read_text())["coefficients"]]


def _set_option(pipe, key, value) -> None:
    from omegaconf import open_dict

    with open_dict(pipe.cfg):
        pipe.cfg.sample.cache_options[key] = value


def _plain(node) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(node, resolve=True) if not isinstance(node, dict) else node


# -- torch.compile --------------------------------------------------------------------------------------------

class _CompileState:
    """Shared by all compiled units of a process: the first backend failure switches everything to eager."""

    failed: Optional[str] = None


class _Compiled:
    def __init__(self, forward, backend: str, cuda_graphs: bool = False):
        self.eager = forward
        self.cuda_graphs = cuda_graphs
        # mode="reduce-overhead": inductor records each shape's kernels as a CUDA graph and replays it, removing
        # the per-kernel launch cost that dominates small batches on a GPU (shapes are static while sampling)
        self.compiled = torch.compile(forward, backend=backend, mode="reduce-overhead" if cuda_graphs else None)

    def __call__(self, *args, **kwargs):
        if _CompileState.failed is None:
            try:
                if not self.cuda_graphs:
                    return self.compiled(*args, **kwargs)
                torch.compiler.cudagraph_mark_step_begin()
                # A replay writes into the graph's own output buffers: clone, since callers keep outputs across
                # calls (a cache's stored features, a multistep solver's previous model outputs).
                return torch.utils._pytree.tree_map_only(torch.Tensor, torch.clone, self.compiled(*args, **kwargs))
            except Exception as e:  # a missing compiler / unsupported backend; a model bug fails again below
                _CompileState.failed = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:300]
                print(f"[ditk] note: torch.compile is unavailable here ({_CompileState.failed}); running eager",
                      file=sys.stderr)
        return self.eager(*args, **kwargs)


def compile_backend() -> str:
    # inductor by default; DITK_COMPILE_BACKEND=eager traces with dynamo only (fast, used by the tests).
    return os.environ.get("DITK_COMPILE_BACKEND", "inductor")


@contextlib.contextmanager
def compiled_units(model, policy, enabled: bool, cuda_graphs: bool = False):
    """While active, the units the policy runs (DiT blocks with no cache; the attention / MLP modules for
    FORA and TaylorSeer; blocks for the block-level policies) use a torch.compile'd forward. Only these are
    compiled, so the cache's Python decisions stay outside the compiled graphs; a unit keeps its compiled
    function across calls (compiled once per shape). cuda_graphs (`sample.cuda_graphs`): also capture each
    unit's kernels as CUDA graphs and replay them."""
    if cuda_graphs:
        check_cuda_graphs(next(model.parameters()).device, enabled)
    if not enabled:
        yield
        return
    units = [patch_target(unit) for _, unit in policy.units(denoiser_of(model))]
    touched = []
    try:
        for owner, attr in units:
            if attr in owner.__dict__:
                continue
            key = ("_ditk_compiled" if attr == "forward" else f"_ditk_compiled_{attr}") + ("_graphs" if cuda_graphs else "")
            if key not in owner.__dict__:  # compiled once per module, kept for later calls
                setattr(owner, key, _Compiled(getattr(owner, attr), compile_backend(), cuda_graphs))
            setattr(owner, attr, owner.__dict__[key])
            touched.append((owner, attr))
        yield
    finally:
        for owner, attr in touched:
            delattr(owner, attr)


def check_cuda_graphs(device: torch.device, compiled: bool) -> None:
    """`sample.cuda_graphs=true` needs what it captures: compiled units on a CUDA device."""
    if device.type != "cuda":
        raise ConfigError(f"sample.cuda_graphs=true replays CUDA graphs, but the model is on {device.type}: "
                          "sample with --device cuda, or drop the key")
    if not compiled:
        raise ConfigError("sample.cuda_graphs=true captures the compiled units: add --compile (sample.compile=true)")


def compile_report(enabled: bool, cuda_graphs: bool = False) -> dict:
    if not enabled:
        return {"requested": False}
    return {"requested": True, "backend": compile_backend(), "cuda_graphs": cuda_graphs,
            "active": _CompileState.failed is None, "note": _CompileState.failed}


# -- TeaCache calibration -------------------------------------------------------------------------------------


def calibrate_teacache(pipe, degree: int = 4) -> Path:
    """Fit TeaCache's rescaling polynomial for this run: sample the first batch of the requested images with
    full compute, pair each step's relative change of the modulated input with the relative change of the
    model output (per row), fit np.polyfit(degree), store it as <run>/teacache.json and use it from now on."""
    from ..atomic import write_text
    from ..generate import modality, sample_images
    from .residual import TeaCache, TeaCacheConfig

    sc = pipe.cfg.sample
    if sc.cache != "teacache":
        raise ConfigError(f"--calibrate fits TeaCache's coefficients: add --cache teacache (got --cache {sc.cache})")
    if getattr(pipe, "run_dir", None) is None:
        raise ConfigError("--calibrate stores the coefficients in a run directory: sample from runs/<name>, or pass "
                          "--cache-opt coefficients=[...] for bare weights")
    recorder = TeaCache(TeaCacheConfig(), record=True)
    indices = list(range(min(sc.num, sc.batch_size)))
    start = time.perf_counter()
    if modality(pipe.cfg) == "audio":  # clips of one training window
        from ..audio.generate import sample_spectrograms

        sample_spectrograms(pipe, indices, cache=recorder)
    else:
        sample_images(pipe, indices, cache=recorder)
    coefficients = recorder.fit(degree)
    x = np.concatenate([p[0] for p in recorder.pairs])
    path = Path(pipe.run_dir) / TEACACHE_FILE
    info = {
        "coefficients": coefficients, "degree": degree, "points": int(np.isfinite(x).sum()),
        "input_change_range": [float(np.nanmin(x)), float(np.nanmax(x[np.isfinite(x)]))],
        "source": pipe.source, "images": len(indices), "seconds": round(time.perf_counter() - start, 3),
        "settings": {k: _plain(sc)[k] for k in ("solver", "steps", "cfg_scale", "cfg_channels", "class_labels", "seed")},
    }
    write_text(path, json.dumps(info, indent=2) + "\n")
    _set_option(pipe, "coefficients", coefficients)
    pipe.policy = None  # rebuilt with the new coefficients
    return path


# -- --compare-to-full ------------------------------------------------------------------------------------------


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 image sets (peak 255), in dB; inf when identical."""
    mse = float(np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))
    return float("inf") if mse == 0 else 10.0 * float(np.log10(255.0**2 / mse))


def compare_to_full(pipe, out_dir: Path) -> dict:
    """Sample the same images (same seeds, labels, settings) with no cache, time both, and measure how far
    the cached images are from them: PSNR over all pixels and per image, the max pixel difference, and FID
    with the digits feature extractor when the run's data are the digits and `ditk.metrics` provides it.
    The full-compute images go to out_dir/full/ (images, samples.npz)."""
    from ..io import save_npz, save_pngs, to_uint8

    sc = pipe.cfg.sample
    indices = list(range(sc.num))
    cached = np.load(out_dir / "samples.npz")["arr_0"]
    # Both timed here, in memory, on all images (the generation above also wrote PNGs, or was resumed).
    full_policy = NoCache()
    images, full_seconds = _timed(pipe, indices, full_policy)
    cached_seconds = _timed(pipe, indices, build_policy(sc.cache, _plain(sc.cache_options)))[1]
    full = to_uint8(images)
    full_dir = out_dir / "full"
    save_pngs(images, full_dir / "images", start_index=0)
    save_npz(full, full_dir / "samples.npz")
    per_image = [psnr(c, f) for c, f in zip(cached, full)]
    finite = [p for p in per_image if np.isfinite(p)]
    result = {
        "images": sc.num,
        "seconds_full": round(full_seconds, 3), "seconds_cached": round(cached_seconds, 3),
        "speedup": round(full_seconds / cached_seconds, 3) if cached_seconds > 0 else None,
        "psnr_db": _round(psnr(cached, full)),
        "psnr_db_min_image": _round(min(per_image)),
        "identical_images": len(per_image) - len(finite),
        "max_abs_pixel_diff": int(np.abs(cached.astype(np.int16) - full.astype(np.int16)).max()),
        "full_model_evaluations": full_policy.stats.report()["model_evaluations"],
        "full_dir": str(full_dir),
        "fid_vs_full": _digits_fid(pipe, out_dir / "samples.npz", full_dir / "samples.npz"),
    }
    return result


def _round(v: float):
    return None if not np.isfinite(v) else round(v, 3)  # JSON has no inf: null means identical


def _timed(pipe, indices, policy):
    from ..generate import sample_images

    sc = pipe.cfg.sample
    chunks = []
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for b in range(0, len(indices), sc.batch_size):
        chunks.append(sample_images(pipe, indices[b:b + sc.batch_size], cache=policy))
    if pipe.device.type == "cuda":
        torch.cuda.synchronize()
    return torch.cat(chunks), time.perf_counter() - start


def _digits_fid(pipe, gen_npz: Path, ref_npz: Path) -> Optional[dict]:
    """FID of the cached samples against the full-compute ones, in the digits classifier's feature space;
    None (and a note) when it does not apply."""
    from omegaconf import OmegaConf

    if OmegaConf.select(pipe.cfg, "data.name") != "digits" or pipe.cfg.sample.num < 2:
        return None
    try:
        from ..metrics.extractors import ExtractorHandle
        from ..metrics.fid import evaluate
    except ImportError:
        print("[ditk] note: no FID in the comparison: ditk.metrics is not installed", file=sys.stderr)
        return None
    result = evaluate(str(gen_npz), str(ref_npz), ExtractorHandle("digits"), use_cache=False, kid=False,
                      progress=False)
    return {"fid": round(float(result["fid"]), 4), "feature_extractor": "digits", "n": result["n_gen"]}
