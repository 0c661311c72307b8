"""Audio clips as the inputs and outputs of `ditk invert` / `ditk edit` for audio models (FluxMusic runs).

A clip goes through the run's own front end, the one its data set trains on (ditk.audio): read (soundfile), made
mono, normalised as the training clips (AudioLDM's normalize_wav: mean removed, peak 0.5; the synthesised `music`
clips are made that way too), turned into the normalised log-mel spectrogram of the run's mel settings, then into the
model's space by the run's autoencoder (identity for `tones-fluxmusic`, the AudioLDM2 mel VAE for the paper
presets). Back to sound through the run's vocoder (`AudioOutput`: the VAE's HiFi-GAN, else Griffin-Lim).

A clip must be exactly one training window: the run's sample rate, and `(frames - 1) * hop` samples (what
`ditk sample` writes for one window). Anything else is a one-line error; `--resize` resamples (soxr) and keeps the
first window (zero-padding a shorter clip), as the `audio-folder` data set pads. normalize_wav is applied to that
window (`audio-folder` applies it to the whole file before cutting a window, so a window of a long training file
may peak below 0.5). Clips longer than one window (MultiDiffusion canvases, as `ditk sample --duration`) are not
inverted.

Reconstruction error of a spectrogram is the log-spectral distance (LSD, dB) on the mel magnitudes M (natural-log
mel from the normalised one, floor 1e-5 as AudioLDM's):
    LSD(M, M') = mean over frames of sqrt( mean over mel bands of (20 log10(M / M'))^2 )
(the usual LSD of power spectra, 10 log10(M^2 / M'^2), on the mel bands). 0 dB is identical.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import ConfigError

AUDIO_SUFFIXES = (".wav", ".flac", ".ogg")
DB_PER_NEPER = 20.0 / math.log(10.0)  # 20 log10(M / M') = DB_PER_NEPER * (ln M - ln M')


def is_audio(pipe) -> bool:
    from ..generate import modality

    return modality(pipe.cfg) == "audio"


def normalize_wav(wave: np.ndarray) -> np.ndarray:
    """AudioLDM's normalize_wav (what `audio-folder` applies to every training clip): mean removed, peak 0.5."""
    wave = wave - wave.mean()
    return 0.5 * wave / (np.abs(wave).max() + 1e-8)


def log_spectral_distance(a: torch.Tensor, b: torch.Tensor) -> list[float]:
    """Per clip LSD in dB between normalised log-mel spectrograms (N, [1,] n_mels, frames) (see the module doc)."""
    from ..audio.mel import denormalize

    la, lb = denormalize(a.double()), denormalize(b.double())
    d = (DB_PER_NEPER * (la - lb)).reshape(len(a), -1, a.shape[-1])  # (N, bands, frames)
    return [float(v) for v in d.pow(2).mean(dim=1).sqrt().mean(dim=1)]


class Clips:
    """The run's audio front end for invert/edit: clip files <-> normalised log-mel windows <-> waveforms."""

    def __init__(self, pipe):
        from ..audio.generate import AudioOutput, window_of

        self.io = AudioOutput(pipe)
        self.front = self.io.front
        self.frames = window_of(pipe.model)[2] * self.io.downsample
        self.samples = self.front.num_samples(self.frames)
        self.rate = self.front.sample_rate

    def describe(self) -> str:
        return f"one {self.samples / self.rate:.3f} s window ({self.samples} samples at {self.rate} Hz)"

    def read(self, path: Path, resize: bool) -> np.ndarray:
        """One clip file -> (samples,) float32 at the run's rate, exactly one window, normalised as the training clips."""
        from ..audio.mel import read_wav

        wave, rate = read_wav(path)
        if rate != self.rate:
            if not resize:
                raise ConfigError(f"{path.name} is {rate} Hz but the model takes {self.rate} Hz audio: pass --resize to "
                                  "resample it")
            wave, rate = read_wav(path, self.rate)
        if len(wave) != self.samples:
            if not resize:
                raise ConfigError(f"{path.name} is {len(wave) / rate:.3f} s ({len(wave)} samples) but the model takes "
                                  f"{self.describe()}: pass --resize to keep its first window (zero-padded if shorter)")
            wave = np.pad(wave[: self.samples], (0, max(0, self.samples - len(wave))))
        if not np.any(wave):
            raise ConfigError(f"{path.name} is silent: there is nothing to invert")
        return normalize_wav(wave.astype(np.float64)).astype(np.float32)

    def load(self, paths: Sequence[Path], resize: bool) -> tuple[torch.Tensor, list[np.ndarray]]:
        """Clip files -> (normalised log-mel (N, 1, n_mels, frames), the waveforms it was computed from)."""
        waves = [self.read(p, resize) for p in paths]
        return torch.stack([self.front(w)[None] for w in waves]), waves

    def waveform(self, spec: torch.Tensor) -> torch.Tensor:
        """Normalised log-mel ([1,] n_mels, frames) -> (samples,) of exactly one window, through the run's vocoder."""
        wave = self.io.waveform(spec.reshape(spec.shape[-2:]))
        return torch.nn.functional.pad(wave[: self.samples], (0, max(0, self.samples - len(wave))))

    def write(self, spec: torch.Tensor, path: Path) -> torch.Tensor:
        """Vocode a spectrogram and write it as a 16-bit WAV; returns the waveform."""
        from ..audio.mel import write_wav

        wave = self.waveform(spec)
        path.parent.mkdir(parents=True, exist_ok=True)
        write_wav(path, wave, self.rate)
        return wave

    def reanalysed(self, wave: torch.Tensor) -> torch.Tensor:
        """The front end's view of a waveform (1, n_mels, frames): what a written WAV sounds like to the model."""
        return self.front(wave.numpy())[None]

    def front_end(self) -> dict:
        c = self.front.cfg
        return {"sample_rate": c.sample_rate, "n_fft": c.n_fft, "win_length": c.win_length, "hop_length": c.hop_length,
                "n_mels": c.n_mels, "fmin": c.fmin, "fmax": c.fmax, "frames": self.frames}
