"""Text-to-music data: `music`, clips made by ditk's synthesiser (ditk.audio.synth, embedded, no download), and
`audio-folder`, captioned audio files of your own.

Item i is a clip whose attributes (melody or chords, rising or falling, slow or fast, key, timbre) are drawn
from a generator seeded by (data.seed, i); the item is its normalised log-mel spectrogram (1, n_mels, frames)
in about [-1, 1] (ditk.audio.mel.normalize) and a caption index. Captions form a finite vocabulary (the data
set's `class_names`, 1000 strings such as "a fast rising melody on a flute in D minor" and the shorter ones
that leave out key and/or timbre), so the `text` conditioner with `caption_template: "{name}"` turns labels
into captions, and classifier-free guidance uses its empty caption. In epoch e, clip i is described by
variant (i + e) mod 4 of its captions, so every clip is seen with each of them.

The mel settings default to the paper's (16 kHz, 64 bins, hop 160, 10.24 s = 1024 frames); the tiny preset
uses hop 512 and 64 frames (2 s). `vocoder` says how `ditk sample` turns generated spectrograms into sound.

`audio-folder` reads the files listed in `<path>/captions.jsonl` (one {"file": ..., "caption": ...} per line),
resamples them, normalises each as AudioLDM does (mean removed, peak 0.5) and cuts one window of `frames`
frames per epoch (the start drawn from (seed, index, epoch); shorter files are zero-padded). Its class names
are the distinct captions, so the same text conditioner applies.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
import torch

from ..audio import vae as _vae  # noqa: F401  (registers the `audioldm2-vae` autoencoder that audio presets name)
from ..audio.mel import MelConfig
from ..errors import ConfigError
from ..registry import DATASETS
from .sampler import _splitmix64, split_index

_CACHE_BYTES = 512 * 2**20  # spectrograms are kept in memory up to this size; beyond it they are re-synthesised


@dataclass
class AudioDataConfig(MelConfig):
    """What every audio data set's section holds: the mel front end (MelConfig's fields: the paper's settings by
    default) and how `ditk sample` turns generated spectrograms into sound."""

    vocoder: str = "griffin-lim"  # griffin-lim (no weights) | path of a HiFi-GAN folder (AudioLDM2 `vocoder/`)
    griffin_lim_iters: int = 64


@dataclass
class MusicConfig(AudioDataConfig):
    num_clips: int = 4096
    frames: int = 1024  # spectrogram frames per clip (the training window): 1024 x 10 ms = 10.24 s (AudioLDM)
    seed: int = 0  # which clips: another seed gives a disjoint-in-practice set (e.g. for a held-out set)


@functools.lru_cache(maxsize=1)
def _vocabulary() -> tuple:
    from ..audio.synth import caption_vocabulary

    return tuple(caption_vocabulary())


class SynthMusic(torch.utils.data.Dataset):
    modality = "audio"

    def __init__(self, cfg: MusicConfig):
        from ..audio.mel import MelSpectrogram, mel_config_from

        if cfg.num_clips <= 0:
            raise ConfigError(f"data.num_clips must be positive, got {cfg.num_clips}")
        if cfg.frames < 8:
            raise ConfigError(f"data.frames must be at least 8, got {cfg.frames}")
        self.cfg = cfg
        self.front = MelSpectrogram(mel_config_from(cfg))
        self.class_names = list(_vocabulary())
        self.num_classes = len(self.class_names)
        self.index = {c: i for i, c in enumerate(self.class_names)}
        self.shape = (1, int(cfg.n_mels), int(cfg.frames))
        self.seconds = self.front.num_samples(cfg.frames) / cfg.sample_rate
        self.epoch = 0
        self._cache: dict[int, torch.Tensor] = {}
        self._cache_limit = _CACHE_BYTES // (4 * cfg.n_mels * cfg.frames)

    def __len__(self) -> int:
        return int(self.cfg.num_clips)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def spec(self, index: int):
        from ..audio.synth import random_spec

        return random_spec(np.random.default_rng([int(self.cfg.seed), int(index)]))

    def waveform(self, index: int) -> np.ndarray:
        from ..audio.synth import synthesize

        samples = self.front.num_samples(self.cfg.frames)
        return synthesize(self.spec(index), samples / self.cfg.sample_rate, self.cfg.sample_rate, seed=index)

    def caption(self, index: int, epoch: int = 0) -> str:
        from ..audio.synth import VARIANTS, caption

        return caption(self.spec(index), VARIANTS[(index + epoch) % len(VARIANTS)])

    def mel(self, index: int) -> torch.Tensor:
        x = self._cache.get(index)
        if x is None:
            x = self.front(self.waveform(index))[None]  # (1, n_mels, frames), normalised
            if len(self._cache) < self._cache_limit:
                self._cache[index] = x
        return x.clone()

    def __getitem__(self, item):
        index, epoch = split_index(item, self.epoch)
        return self.mel(index), self.index[self.caption(index, epoch)]


@DATASETS.register("music", config=MusicConfig)
def build_music(cfg) -> SynthMusic:
    """Synthesised music clips (melodies/chords: tempo, direction, key, timbre) with captions, no download."""
    return SynthMusic(cfg)


build_music.modality = "audio"


@dataclass
class AudioFolderConfig(AudioDataConfig):
    path: str = "???"  # folder holding the audio files and captions.jsonl
    captions: str = "captions.jsonl"  # JSON lines {"file": relative path, "caption": text}
    frames: int = 1024
    seed: int = 0  # window positions


class AudioFolder(torch.utils.data.Dataset):
    modality = "audio"

    def __init__(self, cfg: AudioFolderConfig):
        import json
        from pathlib import Path

        from ..audio.mel import MelSpectrogram, mel_config_from

        root = Path(str(cfg.path)).expanduser()
        listing = root / cfg.captions
        if not listing.is_file():
            raise ConfigError(f"no {cfg.captions} in data.path '{cfg.path}': list the clips there as JSON lines "
                              '{"file": "a.wav", "caption": "..."}')
        self.files, captions = [], []
        for n, line in enumerate(listing.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
                file, text = root / entry["file"], str(entry["caption"])
            except (ValueError, KeyError, TypeError):
                raise ConfigError(f"{listing} line {n} is not a JSON object with 'file' and 'caption'") from None
            if not file.is_file():
                raise ConfigError(f"{listing} line {n} names a missing file '{file}'")
            self.files.append(file)
            captions.append(text)
        if not self.files:
            raise ConfigError(f"{listing} lists no audio files")
        self.cfg = cfg
        self.front = MelSpectrogram(mel_config_from(cfg))
        self.class_names = sorted(set(captions))
        self.num_classes = len(self.class_names)
        index = {c: i for i, c in enumerate(self.class_names)}
        self.labels = [index[c] for c in captions]
        self.shape = (1, int(cfg.n_mels), int(cfg.frames))
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.files)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def waveform(self, index: int, epoch: int = 0) -> np.ndarray:
        from ..audio.mel import read_wav

        wave, _ = read_wav(self.files[index], self.cfg.sample_rate)
        wave = wave - wave.mean()
        wave = 0.5 * wave / (np.abs(wave).max() + 1e-8)  # AudioLDM's normalize_wav
        size = self.front.num_samples(self.cfg.frames)
        if len(wave) > size:
            h = _splitmix64(_splitmix64(int(self.cfg.seed) ^ index) ^ epoch)
            start = h % (len(wave) - size + 1)
            return wave[start:start + size]
        return np.pad(wave, (0, size - len(wave)))

    def __getitem__(self, item):
        index, epoch = split_index(item, self.epoch)
        return self.front(self.waveform(index, epoch))[None], self.labels[index]


@DATASETS.register("audio-folder", config=AudioFolderConfig)
def build_audio_folder(cfg) -> AudioFolder:
    """Your captioned audio files (captions.jsonl), as normalised log-mel windows."""
    return AudioFolder(cfg)


build_audio_folder.modality = "audio"
