"""Fréchet audio distance (FAD) for `ditk evaluate-fid --modality audio`, with a trained A-JEPA run as the
feature network.

FAD (Kilgour et al., 2019) is FID's Fréchet distance between Gaussians fitted to embeddings of two sets of
audio. ditk's embedding is A-JEPA's (ditk.audio.ajepa): the run's target encoder, tokens averaged. Each file,
in any format soundfile reads, is
  - made mono and resampled (soxr) to the run's sample rate,
  - turned into the normalised log-mel spectrogram of the run's data front end (ditk.audio.mel),
  - cut into windows of the model's `frames`, one after the other (hop = one window), the last partial window
    dropped, and a clip shorter than one window padded with silence (the log-mel floor),
  - and every window is one observation, as FAD does with VGGish's 0.96 s windows.
Everything after the features is ditk.metrics' (clean-fid's arithmetic): `frechet_distance`, `kernel_distance`
(KID on the same embeddings), statistics files (`--save-stats`) and the reference-statistics cache, keyed by
the sha256 of the run's weights, so statistics are never compared across feature networks.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from .. import __version__
from ..errors import DitkError
from . import stats as stats_io
from .fid import comparison_result, frechet_distance, kernel_distance
from .stats import Stats

AUDIO_EXTENSIONS = ("wav", "flac", "ogg", "oga", "aif", "aiff", "mp3")  # what soundfile (libsndfile) reads
EXTRACTOR = "a-jepa"
MODE = "audio"


@dataclass
class AudioFiles:
    """A set of audio files to embed (a folder, read recursively in sorted order)."""

    role: str
    source: str
    files: list
    name: str
    cache_key: str

    @property
    def count(self) -> int:
        return len(self.files)


Side = Union[AudioFiles, Stats]


def load_side(path: Union[str, os.PathLike], role: str) -> Side:
    """A folder of audio files, or a statistics file written by --save-stats."""
    path = Path(path)
    if not path.exists():
        raise DitkError(f"{role} '{path}' does not exist: pass a folder of audio files or a statistics file (.npz)")
    if path.is_dir():
        return audio_folder(path, role)
    if path.suffix == ".npz":
        stats = stats_io.load(path, role)
        if stats.meta and (stats.meta.get("extractor"), stats.meta.get("mode")) != (EXTRACTOR, MODE):
            raise DitkError(f"{role} statistics {path} were computed with --extractor {stats.meta.get('extractor')} "
                            f"--mode {stats.meta.get('mode')}, not from audio with A-JEPA features: recompute them "
                            f"with --modality audio")
        return stats
    raise DitkError(f"{role} '{path}' is not a folder of audio files or a statistics file (.npz with mu, sigma)")


def audio_folder(folder: Path, role: str) -> AudioFiles:
    root = glob.escape(str(folder))
    files = sorted({f for ext in AUDIO_EXTENSIONS for e in (ext, ext.upper())
                    for f in glob.glob(os.path.join(root, f"**/*.{e}"), recursive=True)})
    if not files:
        raise DitkError(f"{role} folder {folder} holds no audio files: expected {', '.join(AUDIO_EXTENSIONS)} files")
    digest = hashlib.sha256()
    for f in files:
        st = os.stat(f)
        digest.update(f"{os.path.relpath(f, folder)}\t{st.st_size}\t{st.st_mtime_ns}\n".encode())
    return AudioFiles(role=role, source=str(folder), files=files, name=folder.name or "audio",
                      cache_key="audio-folder:" + digest.hexdigest())


class AJEPAFeatures:
    """An A-JEPA run (or one of its checkpoints) as a feature network: audio -> one embedding per window."""

    name, mode = EXTRACTOR, MODE

    def __init__(self, source: Union[str, os.PathLike], device: str = "cpu"):
        from ..audio.mel import MelSpectrogram, mel_config_from
        from ..build import build_model
        from ..config import load_run_config
        from ..runs import load_weights, resolve_checkpoint
        from .offline import sha256_file

        run_dir, ckpt = resolve_checkpoint(source)
        cfg = load_run_config(run_dir)
        if cfg.model.name != "a-jepa":
            raise DitkError(f"--features {source} is a '{cfg.model.name}' run: the audio FAD needs an A-JEPA run "
                            f"(ditk train a-jepa-tiny, or another a-jepa-* preset)")
        if not hasattr(cfg.data, "sample_rate") or not hasattr(cfg.data, "hop_length"):
            raise DitkError(f"--features {source} was trained on '{cfg.data.name}', which has no audio front end")
        self.run_dir, self.checkpoint, self.device = Path(run_dir), Path(ckpt), torch.device(device)
        self.model = build_model(cfg)
        self.model.load_state_dict(load_weights(ckpt, "model"))  # the target encoder lives in the model weights
        self.model.to(self.device).eval()
        self.front = MelSpectrogram(mel_config_from(cfg.data))
        self.sample_rate = int(cfg.data.sample_rate)
        self.frames, self.n_mels = int(self.model.frames), int(self.model.input_size)
        if self.front.n_mels != self.n_mels:
            raise DitkError(f"run {run_dir}: data.n_mels={self.front.n_mels} but model.input_size={self.n_mels}")
        self.dim = int(self.model.hidden_size)
        self.weights_sha256 = sha256_file(self.checkpoint / "model.safetensors")
        self.front_end = {**asdict(self.front.cfg), "frames": self.frames}
        self.windowing = (f"windows of {self.frames} frames ({self.front.seconds(self.frames):.3f} s), hop one window; "
                          f"last partial window dropped; shorter clips padded with silence")
        # what the statistics cache keys on, besides the weights (stats_io.cache_path reads `resize`)
        self.resize = json.dumps(self.front_end, sort_keys=True)

    def windows(self, wave: np.ndarray) -> torch.Tensor:
        """Mono samples at the run's rate -> (W, 1, n_mels, frames) normalised log-mel windows."""
        from ..audio.mel import LOG_FLOOR, normalize

        if len(wave) <= self.front.n_fft // 2:  # too short for one STFT frame: pad (silence) to one window
            wave = np.pad(wave, (0, self.front.num_samples(self.frames) - len(wave)))
        spec = self.front(wave)  # (n_mels, T)
        total = spec.shape[-1]
        if total < self.frames:
            silence = normalize(torch.tensor(LOG_FLOOR))
            spec = torch.cat([spec, silence.expand(spec.shape[0], self.frames - total)], dim=-1)
        count = spec.shape[-1] // self.frames
        return spec[:, :count * self.frames].reshape(self.n_mels, count, self.frames).permute(1, 0, 2)[:, None]

    @torch.no_grad()
    def embed_files(self, files: list, batch_size: int = 64, progress: bool = True,
                    desc: str = "features") -> np.ndarray:
        """(windows, D) float32 embeddings of the files, in file then time order."""
        from tqdm import tqdm

        from ..audio.mel import read_wav

        out, pending = [], []

        def flush():
            batch = torch.cat(pending).to(self.device)
            out.append(self.model.features(batch).float().cpu().numpy())
            pending.clear()

        queued = 0
        for f in tqdm(files, desc=desc, file=sys.stderr, disable=not progress):
            wave, _ = read_wav(f, self.sample_rate)
            w = self.windows(wave)
            pending.append(w)
            queued += len(w)
            if queued >= batch_size:
                flush()
                queued = 0
        if pending:
            flush()
        return np.concatenate(out)

    def protocol(self) -> dict:
        return {"extractor": EXTRACTOR, "mode": MODE, "weights_sha256": self.weights_sha256, "feature_dim": self.dim,
                "features": str(self.run_dir), "checkpoint": self.checkpoint.name, "front_end": self.front_end,
                "windowing": self.windowing, "resize": self.resize, "ditk_version": __version__}


def side_stats(side: Side, extractor: Optional[AJEPAFeatures], *, cache_root: Optional[Path] = None,
               batch_size: int = 64, progress: bool = True) -> tuple[Stats, dict]:
    """Statistics of one side and how they were obtained ({"cache": path or None, "cache_hit": bool})."""
    if isinstance(side, Stats):
        return side, {"cache": None, "cache_hit": False}
    path = None
    if cache_root is not None:
        path = stats_io.cache_path(cache_root, side.name, f"{extractor.n_mels}x{extractor.frames}", side.cache_key,
                                   extractor)
    if path is not None and path.is_file():
        cached = stats_io.load(path, "cached")
        if cached.meta.get("files") == side.count:
            print(f"[ditk] {side.role}: reusing cached statistics {path}", file=sys.stderr)
            return cached, {"cache": str(path), "cache_hit": True}
    feats = extractor.embed_files(side.files, batch_size=batch_size, progress=progress, desc=f"{side.role} features")
    if len(feats) < 2:
        raise DitkError(f"{side.role} {side.source} gives {len(feats)} window(s) of audio: the FAD needs at least 2")
    stats = stats_io.from_features(feats, {**extractor.protocol(), "files": side.count}, source=side.source)
    if path is not None:
        stats_io.save(stats, path)
    return stats, {"cache": str(path) if path else None, "cache_hit": False}


def _check_stats(stats: Stats, extractor: Optional[AJEPAFeatures], role: str) -> None:
    if not stats.meta:
        print(f"[ditk] note: {role} statistics {stats.source} carry no protocol record; they must come from the same "
              f"A-JEPA features for the FAD to mean anything", file=sys.stderr)
        return
    if extractor is not None and stats.meta.get("weights_sha256") != extractor.weights_sha256:
        raise DitkError(f"{role} statistics {stats.source} were computed with other A-JEPA weights (sha256 "
                        f"{str(stats.meta.get('weights_sha256'))[:12]}..., not {extractor.weights_sha256[:12]}... of "
                        f"--features {extractor.run_dir}): recompute them")


def _extractor(features: Optional[str], device: str, sides: list) -> Optional[AJEPAFeatures]:
    if features is None:
        if any(not isinstance(s, Stats) for s in sides):
            raise DitkError("--modality audio needs --features RUN (a trained A-JEPA run, e.g. runs/a-jepa-tiny) to "
                            "embed audio files")
        return None
    return AJEPAFeatures(features, device)


def _describe(side: Side) -> dict:
    if isinstance(side, Stats):
        return {"path": side.source, "kind": f"stats ({side.layout})"}
    return {"path": side.source, "kind": "folder", "files": side.count}


def evaluate(gen: Union[str, os.PathLike, Side], ref: Union[str, os.PathLike, Side], features: Optional[str], *,
             device: str = "cpu", cache_dir: Optional[str] = None, use_cache: bool = True,
             save_stats: Optional[str] = None, kid: bool = True, kid_subsets: int = 100, kid_subset_size: int = 1000,
             seed: int = 0, batch_size: int = 64, progress: bool = True) -> dict:
    """FAD (and KID on the same embeddings) of GEN against REF. Returns the JSON-ready result."""
    start = time.perf_counter()
    gen = gen if isinstance(gen, (AudioFiles, Stats)) else load_side(gen, "gen")
    ref = ref if isinstance(ref, (AudioFiles, Stats)) else load_side(ref, "ref")
    extractor = _extractor(features, device, [gen, ref])
    for side, role in ((gen, "gen"), (ref, "ref")):
        if isinstance(side, Stats):
            _check_stats(side, extractor, role)
    if extractor is None and gen.meta.get("weights_sha256") != ref.meta.get("weights_sha256"):
        raise DitkError(f"gen statistics {gen.source} and ref statistics {ref.source} come from different A-JEPA "
                        f"weights: recompute one with the other's --features")
    gen_stats, _ = side_stats(gen, extractor, batch_size=batch_size, progress=progress)
    ref_stats, ref_info = side_stats(ref, extractor, cache_root=stats_io.cache_root(cache_dir) if use_cache else None,
                                     batch_size=batch_size, progress=progress)
    if gen_stats.dim != ref_stats.dim:
        raise DitkError(f"gen features are {gen_stats.dim}-d but ref features are {ref_stats.dim}-d: the two sides "
                        f"come from different feature networks")
    for stats, role in ((gen_stats, "gen"), (ref_stats, "ref")):
        if stats.n is not None and stats.n <= stats.dim:
            print(f"[ditk] note: {role} has {stats.n} windows for {stats.dim}-d features: its covariance is singular, "
                  f"so the FAD is biased upwards and noisy", file=sys.stderr)
    fad = frechet_distance(gen_stats.mu, gen_stats.sigma, ref_stats.mu, ref_stats.sigma)
    kid_mean = kid_std = None
    if kid and gen_stats.feats is not None and ref_stats.feats is not None:
        kid_mean, kid_std = kernel_distance(gen_stats.feats, ref_stats.feats, kid_subsets, kid_subset_size, seed)
    if save_stats:
        stats_io.save(ref_stats, save_stats)
    meta = extractor.protocol() if extractor is not None else ref_stats.meta
    protocol = {
        "gen_files": gen.count if isinstance(gen, AudioFiles) else gen.meta.get("files"),
        "ref_files": ref.count if isinstance(ref, AudioFiles) else ref.meta.get("files"),
        "modality": MODE,
        "feature_extractor": EXTRACTOR,
        "features": meta.get("features"),
        "checkpoint": meta.get("checkpoint"),
        "feature_dim": gen_stats.dim,
        "weights_sha256": meta.get("weights_sha256"),
        "front_end": meta.get("front_end"),
        "windowing": meta.get("windowing"),
    }
    return comparison_result("fad", fad, (kid_mean, kid_std), gen_stats, ref_stats, protocol,
                             gen=_describe(gen), ref=_describe(ref), ref_info=ref_info, save_stats=save_stats,
                             kid_subsets=kid_subsets, kid_subset_size=kid_subset_size, seed=seed, start=start)


def compute_stats(side: Union[str, os.PathLike, Side], features: Optional[str], out: str, *, device: str = "cpu",
                  batch_size: int = 64, progress: bool = True) -> dict:
    """Statistics of one set of audio, written to `out` (to reuse as REF)."""
    start = time.perf_counter()
    side = side if isinstance(side, (AudioFiles, Stats)) else load_side(side, "ref")
    extractor = _extractor(features, device, [side])
    if isinstance(side, Stats):
        _check_stats(side, extractor, "ref")
    stats, _ = side_stats(side, extractor, batch_size=batch_size, progress=progress)
    stats_io.save(stats, out)
    return {"saved_stats": str(out), "n": stats.n, "files": stats.meta.get("files"), "modality": MODE,
            "feature_extractor": EXTRACTOR, "feature_dim": stats.dim,
            "weights_sha256": stats.meta.get("weights_sha256"),
            "source": _describe(side), "seconds": round(time.perf_counter() - start, 3), "ditk_version": __version__}
