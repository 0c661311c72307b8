"""Sampling from a trained run or a checkpoint: images, grid, `.npz`, and a JSON report.

Each image i has its own generator seeded by (seed, i) for its initial noise and for every stochastic
solver step, so image i is the same whatever the batch size, and an interrupted `ditk sample` resumes by
generating only the indices whose PNG is missing.
"""

from __future__ import annotations

import json
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
from omegaconf import DictConfig

from .build import build_autoencoder, build_conditioner, build_model, build_objective, check_model_objective, latent_shape
from .config import load_run_config, resolve
from .errors import ConfigError
from .atomic import clean_temp
from .runs import load_weights, resolve_checkpoint, save_json


@dataclass
class Pipeline:
    cfg: DictConfig
    model: torch.nn.Module
    objective: object
    autoencoder: object
    conditioner: object
    device: torch.device
    source: str = ""
    run_dir: Optional[Path] = None  # None for bare weights
    policy: object = None  # the ditk.cache policy, built on first use (ditk.cache.pipeline.policy_for)
    checkpoint: Optional[Path] = None  # the run's checkpoint the weights came from (verified)


def peak_rss_mb() -> float:
    """This process's own peak resident memory. Linux's `ru_maxrss` carries the parent's peak across fork/exec (a
    `ditk` spawned by a large process would report the parent's), so read the kernel's VmHWM where it exists."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)  # kB
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)  # KiB on Linux, the fallback


def pick_device(name: str = "auto") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError("--device cuda was asked for but no CUDA device is visible: use --device cpu")
    return torch.device(name)


def load_pipeline(source: str, preset: Optional[str] = None, overrides: Sequence[str] = (), weights: str = "ema",
                  device: str = "auto") -> Pipeline:
    """A run dir, a checkpoint dir, or foreign weights (official DiT `.pt`, ditk/other `.safetensors`,
    a diffusers model folder) + the preset that describes their architecture."""
    path = Path(source)
    if not path.exists():
        raise ConfigError(f"'{source}' does not exist: pass a run directory (runs/<name>), a checkpoint or a weights file")
    if (path / "config.yaml").is_file() or (path / "state.pt").is_file():
        if weights != "ema" and (path / "quantization.json").is_file():
            raise ConfigError(f"{source} is a `ditk quantize` output: it holds only the quantized EMA weights, so "
                              "drop --weights model (or sample the source run named in its lineage.json)")
        run_dir, ckpt = resolve_checkpoint(path, files=(f"{weights}.safetensors",))  # verifies what it reads
        cfg = load_run_config(run_dir, overrides)
        # a quantized folder's weights are read by quantize.folder.load_into below, never as a plain state dict
        # (that would hold a second full copy of a simulated model's dequantized weights for nothing)
        state_dict = None if (run_dir / "quantization.json").is_file() else load_weights(ckpt, weights)
        label = f"{run_dir.name}/{ckpt.name}/{weights}"
        classes = run_dir / "classes.json"
        class_names = json.loads(classes.read_text()) if classes.is_file() else None
    else:
        if preset is None:
            raise ConfigError(f"'{source}' is a weights file, not a run: add --preset NAME to say which architecture it holds (e.g. --preset dit-xl-2)")
        cfg = resolve(preset, overrides, allow_missing=("data",))
        state_dict = None
        label = path.name
        class_names = None
        run_dir = None
    dev = pick_device(device)
    if cfg.sample.cuda_graphs:  # before anything is built or written
        from .cache.pipeline import check_cuda_graphs

        check_cuda_graphs(dev, cfg.sample.compile)
    model = build_model(cfg)
    objective = build_objective(cfg)
    if not objective.solvers:  # e.g. A-JEPA, an encoder: say so before anything else is built or drawn
        raise ConfigError(getattr(objective, "why_no_solvers", f"objective '{objective.name}' has nothing to sample"))
    check_model_objective(model, objective, cfg)
    if run_dir is not None and (run_dir / "quantization.json").is_file():  # `ditk quantize` output: quantized layers
        from .quantize.folder import load_into

        load_into(model, run_dir, ckpt)
    elif state_dict is not None:
        from .models.convert import load_state_dict_checked

        # weights that disagree with config.yaml (an edited depth, ...) are one line naming the key
        load_state_dict_checked(model, state_dict, str(ckpt / f"{weights}.safetensors"))
    else:
        from .models.convert import load_pretrained

        load_pretrained(model, path)
    model.to(dev).eval().requires_grad_(False)
    autoencoder = build_autoencoder(cfg).to(dev)
    num_classes = len(class_names) if class_names else model.num_classes
    conditioner = build_conditioner(cfg, num_classes, class_names, model=model)
    if getattr(conditioner, "unconditional", False):  # model.num_classes=0: no guidance, no class labels
        conditioner.check_sample_settings(cfg.sample)
    return Pipeline(cfg, model, objective, autoencoder, conditioner, dev, label, run_dir=run_dir,
                    checkpoint=ckpt if run_dir is not None else None)


def modality(cfg: DictConfig) -> str:
    """'audio' for runs on an audio data set (they sample clips: ditk.audio.generate), else 'image'."""
    from .registry import DATASETS

    return getattr(DATASETS.get(cfg.data.name).builder, "modality", "image")


def class_labels(spec: str, indices: Sequence[int], num_classes: int, seed: int, conditioner) -> torch.Tensor:
    """uniform: index i gets class i mod K (balanced, as FID protocols want); random: seeded per index;
    otherwise a list of labels ("1,7,9" or class names) cycled over the indices."""
    if spec == "uniform":
        return torch.tensor([i % num_classes for i in indices])
    if spec == "random":
        return torch.tensor([int(torch.randint(num_classes, (1,), generator=torch.Generator().manual_seed(seed * 7919 + i)))
                             for i in indices])
    chosen = conditioner.parse_labels(spec)
    return torch.tensor([chosen[i % len(chosen)] for i in indices])


def image_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    return [torch.Generator().manual_seed((seed * 1_000_003 + i) % (2**63)) for i in indices]


@torch.no_grad()
def sample_images(pipe: Pipeline, indices: Sequence[int], progress: bool = False, cache=None) -> torch.Tensor:
    """Images for the given global indices, in [-1, 1], (N, C, H, W) on the CPU. cache: a ditk.cache policy
    (default: the pipeline's, from sample.cache)."""
    from .cache.pipeline import compiled_units, policy_for
    from .sampling import sample

    sc = pipe.cfg.sample
    model = pipe.model
    gens = image_generators(sc.seed, indices)
    shape = latent_shape(model)
    noise = torch.stack([torch.randn(shape, generator=g) for g in gens]).to(pipe.device)
    if sc.prompt:
        if not hasattr(pipe.conditioner, "encode_prompts"):
            raise ConfigError(f"--prompt needs a text-conditioned model; this one uses the '{pipe.cfg.conditioner.name}' conditioner: use --class-labels")
        cond = pipe.conditioner.encode_prompts([sc.prompt] * len(indices), pipe.device)
    elif getattr(pipe.conditioner, "unconditional", False):  # model.num_classes=0: no labels to draw
        cond = {}
    else:
        labels = class_labels(sc.class_labels, indices, pipe.conditioner.num_classes, sc.seed, pipe.conditioner)
        cond = pipe.conditioner.cond(labels.to(pipe.device))
    uncond = pipe.conditioner.uncond(len(indices), pipe.device) if sc.cfg_scale != 1.0 else None
    policy = cache if cache is not None else policy_for(pipe)
    with compiled_units(model, policy, sc.compile, sc.cuda_graphs):
        latents = sample(model, pipe.objective, noise, cond, uncond, solver=sc.solver, steps=sc.steps,
                         cfg_scale=sc.cfg_scale, cfg_channels=sc.cfg_channels, generator=gens, progress=progress,
                         solver_options=dict(sc.solver_options), cache=policy, precision=sc.precision,
                         time_shift_window=sc.time_shift_window, time_shift_cutoff=sc.time_shift_cutoff)
    return pipe.autoencoder.decode(latents).float().clamp(-1, 1).cpu()


def write_training_grid(pipe: Pipeline, path: Path) -> None:
    """The grid `train` writes every `train.sample_every` steps, from the EMA weights."""
    if modality(pipe.cfg) == "audio":  # audio runs: a picture of the sampled spectrograms
        from .audio.generate import write_training_spectrograms

        return write_training_spectrograms(pipe, path)
    if modality(pipe.cfg) == "caption":  # captioning runs: held-out pictures with their sampled captions
        from .caption.generate import write_training_captions

        return write_training_captions(pipe, path)
    from .io import save_grid

    was_training = pipe.model.training
    pipe.model.eval()
    images = sample_images(pipe, list(range(pipe.cfg.sample.num)))
    pipe.model.train(was_training)
    save_grid(images, path, nrow=_grid_cols(len(images)), scale=pipe.cfg.sample.grid_scale)


def _grid_cols(n: int) -> int:
    return max(1, int(np.ceil(np.sqrt(n))))


def generate_to_dir(pipe: Pipeline, out_dir: Path, progress: bool = True, compare_to_full: bool = False,
                    duration: Optional[float] = None) -> dict:
    """Write images/NNNNNN.png for indices 0..num-1 (skipping those present), grid.png, samples.npz and
    report.json into out_dir. Returns the report. compare_to_full: also sample the same images without the
    cache policy and report speed-up and distance (ditk.cache.pipeline.compare_to_full).
    Audio runs write WAV clips of `duration` seconds instead (ditk.audio.generate)."""
    if modality(pipe.cfg) == "audio":
        if compare_to_full:
            raise ConfigError("--compare-to-full is for image models: drop it for this audio run")
        from .audio.generate import generate_audio_to_dir

        return generate_audio_to_dir(pipe, out_dir, progress=progress, duration=duration)
    if modality(pipe.cfg) == "caption":  # reached through evaluate-fid --run or the API, not `ditk sample`
        raise ConfigError(f"{pipe.source} is a captioning run, it makes captions, not images: use `ditk sample RUN` "
                          "(captions.jsonl and report.json's captioning metrics)")
    if duration is not None:
        raise ConfigError("--duration is for audio models; this run makes images: drop --duration")
    from .cache import pipeline as cache_layer
    from .io import save_grid, save_npz, save_pngs

    sc = pipe.cfg.sample
    policy = cache_layer.policy_for(pipe)  # before the settings check: it may record calibrated coefficients
    cache_layer.reset_counts(policy)
    images_dir = out_dir / "images"
    if hasattr(pipe.model, "reset_sampling_report"):  # a model that reports on its own sampling work (DyDiT's FLOPs)
        pipe.model.reset_sampling_report()

    def write_images(chunk):
        for i, image in zip(chunk, sample_images(pipe, chunk)):
            save_pngs(image[None], images_dir, start_index=i)

    unconditional = getattr(pipe.conditioner, "unconditional", False)
    todo, seconds = fill_folder(pipe, out_dir, images_dir, ".png", write_images, progress=progress, noun="images",
                                extra_settings={"conditioning": "unconditional"} if unconditional else None)

    from PIL import Image

    arr = np.stack([np.asarray(Image.open(images_dir / f"{i:06d}.png")) for i in range(sc.num)])
    if arr.ndim == 3:  # grayscale PNGs -> NHWC with one channel
        arr = arr[..., None]
    save_npz(arr, out_dir / "samples.npz")
    grid = torch.from_numpy(arr[: min(sc.num, 100)]).permute(0, 3, 1, 2).float() / 127.5 - 1
    save_grid(grid, out_dir / "grid.png", nrow=_grid_cols(len(grid)), scale=sc.grid_scale)
    report = {
        "source": pipe.source, "num": sc.num, "generated_now": len(todo), "seconds": round(seconds, 3),
        "images_per_sec": round(len(todo) / seconds, 3) if todo else None,
        "peak_memory_mb": round(torch.cuda.max_memory_allocated() / 2**20, 1) if torch.cuda.is_available() else None,
        "device": str(pipe.device), "settings": json.loads(json.dumps(dict(_plain(sc)))),
        "seconds_per_image": round(seconds / len(todo), 5) if todo else None,
        "peak_rss_mb": peak_rss_mb(),
        "cache": policy.report(), "compile": cache_layer.compile_report(sc.compile, sc.cuda_graphs),
    }
    if unconditional:  # say so: the sample section's class_labels was not used
        report["conditioning"] = "unconditional"
        report["settings"]["class_labels"] = None
    if hasattr(pipe.model, "sampling_report"):  # e.g. DyDiT: FLOPs spent per sampler step, total, dense fraction
        report["model"] = pipe.model.sampling_report()
    if compare_to_full:
        report["comparison"] = cache_layer.compare_to_full(pipe, out_dir)
    save_json(out_dir / "report.json", report)
    return report


def fill_folder(pipe: Pipeline, out_dir: Path, folder: Path, suffix: str, write_batch, progress: bool = True,
                noun: str = "images", extra_settings: Optional[dict] = None) -> tuple[list[int], float]:
    """The resumable loop of `ditk sample`, for images and audio clips alike: refuse an out_dir made with other
    settings (settings.json), then call write_batch(indices) for the indices 0..num-1 whose folder/NNNNNN<suffix>
    is missing, sample.batch_size at a time (write_batch writes that file last, so it marks the index as done).
    Returns (the indices generated now, their wall-clock seconds)."""
    from tqdm import tqdm

    sc = pipe.cfg.sample
    for key in ("num", "batch_size"):
        if sc[key] < 1:
            raise ConfigError(f"sample.{key}={sc[key]}: it must be at least 1 (--{key.replace('_', '-')} N)")
    folder.mkdir(parents=True, exist_ok=True)
    _check_same_settings(out_dir, pipe, extra_settings, noun, folder)
    clean_temp(folder, older_than=600)  # leftovers of writes a killed `ditk sample` interrupted (not in progress)
    todo = [i for i in range(sc.num) if not (folder / f"{i:06d}{suffix}").is_file()]
    if suffix == ".png":
        _check_images(folder, [i for i in range(sc.num) if i not in set(todo)])
    if len(todo) < sc.num:
        print(f"[ditk] resuming: {sc.num - len(todo)} of {sc.num} {noun} already in {folder}", file=sys.stderr)
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    unit = {"images": "img", "clips": "clip"}.get(noun, noun)
    bar = tqdm(total=len(todo), desc="sample", unit=unit, file=sys.stderr, disable=not progress, dynamic_ncols=True)
    for b in range(0, len(todo), sc.batch_size):
        chunk = todo[b:b + sc.batch_size]
        write_batch(chunk)
        bar.update(len(chunk))
    bar.close()
    return todo, time.perf_counter() - start


def _image_settings(pipe: Pipeline, extra: Optional[dict] = None) -> dict:
    """Every setting that changes image i: the source (run, checkpoint, ema/model) and the sample section,
    less num, batch_size and grid_scale (`extra`: settings outside it, e.g. an audio clip's duration)."""
    settings = {"source": pipe.source, **(extra or {}), **_plain(pipe.cfg.sample)}
    for key in ("num", "batch_size", "grid_scale"):  # these do not change image i
        settings.pop(key)
    return json.loads(json.dumps(settings))


def _check_same_settings(out_dir: Path, pipe: Pipeline, extra: Optional[dict] = None, noun: str = "images",
                         folder: Optional[Path] = None) -> None:
    """Images (clips) already in out_dir are reused only if they were made with the same source and settings.
    settings.json only binds a folder that holds some: a command that failed before its first image leaves
    nothing that refuses the corrected one."""
    settings = _image_settings(pipe, extra)
    path = out_dir / "settings.json"
    holds = folder is None or any(p.is_file() and not p.name.startswith(".") for p in folder.iterdir())
    if path.is_file() and holds:
        try:
            old = json.loads(path.read_text())
        except ValueError:
            raise ConfigError(f"{path} is damaged (not JSON): delete {out_dir} or pass another --out") from None
        if old != settings:
            changed = sorted(k for k in set(old) | set(settings) if old.get(k) != settings.get(k))
            shown = ", ".join(f"{k}: {old.get(k)!r} there, {settings.get(k)!r} now" for k in changed[:3])
            raise ConfigError(f"{out_dir} holds {noun} made with other settings ({shown}): pass another --out")
    else:
        save_json(path, settings)


def _check_images(folder: Path, indices: Sequence[int]) -> None:
    """The PNGs an interrupted run left must be whole before they are reused (a truncated or damaged file would
    otherwise stop the final .npz): one line naming the first bad one."""
    from PIL import Image

    for i in indices:
        path = folder / f"{i:06d}.png"
        try:
            with Image.open(path) as im:
                im.verify()  # reads every chunk and checks its CRC: a truncated or bit-flipped PNG fails
        except Exception as e:
            raise ConfigError(f"{path} is damaged ({type(e).__name__}): delete it and rerun, which regenerates "
                              f"the missing images") from None


def _plain(section) -> dict:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(section, resolve=True)


def prompt_tag(prompt: str, max_chars: int = 40) -> str:
    """A short, filesystem-safe tag of a prompt for folder names: its lower-case ASCII words joined by '-' (at
    most `max_chars` characters) and 6 hex digits of its SHA-1, so prompts that differ only in case, punctuation
    or beyond the cut still get different folders. "a handwritten three" -> "a-handwritten-three-237a6d"."""
    import hashlib
    import re

    words = re.sub(r"[^a-z0-9]+", "-", prompt.lower()).strip("-")[:max_chars].strip("-")
    digest = hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:6]
    return f"{words}-{digest}" if words else f"prompt-{digest}"


# Sample settings the default folder name spells out; any other one that differs from its default adds a hash.
_NAMED = ("solver", "steps", "cfg_scale", "seed", "cache", "time_shift_window", "prompt", "class_labels",
          "num", "batch_size", "grid_scale")


def default_out_dir(pipe: Pipeline, source: str, duration: Optional[float] = None) -> Path:
    """<run>/generated/<ckpt>-<settings>: the name carries every setting that changes the images, so two
    commands that differ in one never meet in one folder (readable for the common ones, a hash for the rest)."""
    import dataclasses
    import hashlib

    from .schema import SampleConfig

    sc = pipe.cfg.sample
    tag = f"{sc.solver}{sc.steps}-cfg{sc.cfg_scale:g}-seed{sc.seed}"
    tag += f"-{duration:g}s" if duration else ""
    tag += f"-{sc.cache}" if sc.cache != "none" else ""
    tag += f"-ts{sc.time_shift_window}" if sc.time_shift_window else ""
    tag += f"-{prompt_tag(sc.prompt)}" if sc.prompt else ""
    if not sc.prompt and sc.class_labels != "uniform" and not getattr(pipe.conditioner, "unconditional", False):
        tag += f"-labels-{prompt_tag(str(sc.class_labels), 24)}"
    tag += "-model" if pipe.source.endswith("/model") else ""  # --weights model (the EMA is the default)
    defaults = {f.name: (f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default)
                for f in dataclasses.fields(SampleConfig)}
    others = {k: v for k, v in _plain(sc).items() if k not in _NAMED and v != defaults.get(k)}
    if others:
        tag += "-" + hashlib.sha1(json.dumps(others, sort_keys=True).encode()).hexdigest()[:6]
    path = Path(source)
    if pipe.checkpoint is not None and pipe.run_dir is not None:  # the checkpoint load_pipeline chose
        return pipe.run_dir / "generated" / f"{pipe.checkpoint.name}-{tag}"
    if (path / "config.yaml").is_file() or (path / "state.pt").is_file():
        run_dir, ckpt = resolve_checkpoint(path)
        return run_dir / "generated" / f"{ckpt.name}-{tag}"
    return Path("samples") / f"{path.stem}-{tag}"


def generate(run_dir: str, num: int, seed: int = 0, batch_size: int = 64, out_dir: Optional[str] = None,
             overrides: Sequence[str] = (), progress: bool = True) -> Path:
    """Sample `num` images from a run (the API `evaluate-fid --run` uses). Returns the `.npz` path."""
    overrides = [*overrides, f"sample.num={num}", f"sample.seed={seed}", f"sample.batch_size={batch_size}"]
    pipe = load_pipeline(run_dir, overrides=overrides)
    out = Path(out_dir) if out_dir else default_out_dir(pipe, run_dir)
    generate_to_dir(pipe, out, progress=progress)
    return out / "samples.npz"
