"""The audio front end: waveform <-> log-mel spectrogram, vocoders, WAV files and spectrogram pictures.

Log-mel exactly as the AudioLDM/AudioLDM2 pipelines that FluxMusic trains on compute it (FluxMusic
`config/16k_64.yaml` + AudioLDM's `TacotronSTFT`): 16 kHz mono, STFT with a 1024-point periodic Hann
window, hop 160 (10 ms), centred frames (reflect padding of n_fft/2 on both sides), *magnitude*
spectrum (not power), 64 Slaney mel filters (librosa's defaults: slaney scale, slaney area
normalisation) from 0 to 8 kHz, then natural log with a floor: log(max(mel, 1e-5)). A 10.24 s clip is
1024 frames (AudioLDM drops the 1025th). Arrays are (..., n_mels, frames): frequency is the height,
time the width, everywhere in ditk (the AudioLDM2 VAE wrapper transposes to its (time, mel) layout).

Diffusion models see `normalize(log_mel)`: the fixed affine map of [log(1e-5), 3] onto [-1, 1]
(silence = -1; a full-scale tone peaks near +0.8), the same for every setting, so any model, VAE
wrapper or feature network can undo it without knowing the data set.

Vocoders turn log-mel back into sound: `GriffinLim` needs no weights (mel -> linear magnitude by
non-negative least squares, then librosa's fast Griffin-Lim); `HiFiGan` loads the HiFi-GAN of an
AudioLDM2 folder (`transformers.SpeechT5HifiGan`, what FluxMusic's `sample.py` uses) from a local path.
"""

from __future__ import annotations

import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch

from ..atomic import atomic_path
from ..errors import ConfigError

LOG_FLOOR = math.log(1e-5)  # AudioLDM's dynamic-range compression clamps the mel magnitude at 1e-5
LOG_CEIL = 3.0  # above any log-mel of audio in [-1, 1] with these settings (a full-scale tone: about 2.3)

ArrayLike = Union[torch.Tensor, np.ndarray]


@dataclass
class MelConfig:
    """STFT + mel settings. The defaults are the paper's (FluxMusic / AudioLDM2 16 kHz, 64 bins)."""

    sample_rate: int = 16000
    n_fft: int = 1024
    win_length: int = 1024
    hop_length: int = 160
    n_mels: int = 64
    fmin: float = 0.0
    fmax: float = 8000.0

    def check(self) -> "MelConfig":
        if self.sample_rate <= 0 or self.hop_length <= 0 or self.n_mels <= 0:
            raise ConfigError("sample_rate, hop_length and n_mels must be positive")
        if not 0 < self.win_length <= self.n_fft:
            raise ConfigError(f"win_length {self.win_length} must lie in 1..n_fft ({self.n_fft})")
        if not 0 <= self.fmin < self.fmax <= self.sample_rate / 2:
            raise ConfigError(f"mel range {self.fmin}..{self.fmax} Hz must lie in 0..{self.sample_rate / 2} (Nyquist)")
        return self


def mel_config_from(cfg) -> MelConfig:
    """A MelConfig from any object with the same field names (e.g. a data config section)."""
    return MelConfig(**{k: type(v)(getattr(cfg, k)) for k, v in asdict(MelConfig()).items() if hasattr(cfg, k)}).check()


def normalize(log_mel: torch.Tensor) -> torch.Tensor:
    """log-mel -> about [-1, 1] (the diffusion model's range): [LOG_FLOOR, LOG_CEIL] -> [-1, 1]."""
    return (log_mel - LOG_FLOOR) * (2.0 / (LOG_CEIL - LOG_FLOOR)) - 1.0


def denormalize(x: torch.Tensor) -> torch.Tensor:
    """Inverse of `normalize`; values below -1 map below the floor and are clamped to it."""
    return ((x + 1.0) * ((LOG_CEIL - LOG_FLOOR) / 2.0) + LOG_FLOOR).clamp(min=LOG_FLOOR)


class MelSpectrogram:
    """Waveform (..., samples) -> magnitude STFT / mel / log-mel (..., bins, frames), on any device.

    `frames = samples // hop_length + 1` (centred frames). Filters come from librosa (Slaney mel).
    """

    def __init__(self, cfg: Optional[MelConfig] = None, **overrides):
        cfg = MelConfig(**{**(asdict(cfg) if cfg is not None else {}), **overrides}).check()
        import librosa

        self.cfg = cfg
        self.sample_rate, self.n_fft, self.hop_length = cfg.sample_rate, cfg.n_fft, cfg.hop_length
        self.win_length, self.n_mels = cfg.win_length, cfg.n_mels
        fb = librosa.filters.mel(sr=cfg.sample_rate, n_fft=cfg.n_fft, n_mels=cfg.n_mels, fmin=cfg.fmin, fmax=cfg.fmax)
        self.filters = torch.from_numpy(fb.astype(np.float32))  # (n_mels, n_fft // 2 + 1)
        self.window = torch.hann_window(cfg.win_length, periodic=True)

    def num_frames(self, num_samples: int) -> int:
        return int(num_samples) // self.hop_length + 1

    def num_samples(self, num_frames: int) -> int:
        """Samples that give exactly `num_frames` frames (and that a vocoder returns for them)."""
        return (int(num_frames) - 1) * self.hop_length

    def seconds(self, num_frames: int) -> float:
        return num_frames * self.hop_length / self.sample_rate

    def magnitude(self, wave: ArrayLike) -> torch.Tensor:
        """|STFT|, (..., n_fft // 2 + 1, frames), float32."""
        x = torch.as_tensor(np.asarray(wave) if not isinstance(wave, torch.Tensor) else wave).float()
        lead = x.shape[:-1]
        x = x.reshape(-1, x.shape[-1])
        if x.shape[-1] <= self.n_fft // 2:
            raise ConfigError(f"audio of {x.shape[-1]} samples is too short: the STFT needs more than {self.n_fft // 2}")
        spec = torch.stft(x, self.n_fft, hop_length=self.hop_length, win_length=self.win_length,
                          window=self.window.to(x.device), center=True, pad_mode="reflect", return_complex=True)
        mag = spec.abs()
        return mag.reshape(*lead, *mag.shape[-2:])

    def mel(self, wave: ArrayLike) -> torch.Tensor:
        """Mel magnitude spectrogram (..., n_mels, frames)."""
        mag = self.magnitude(wave)
        return torch.matmul(self.filters.to(mag.device), mag)

    def log_mel(self, wave: ArrayLike) -> torch.Tensor:
        """log(max(mel, 1e-5)), (..., n_mels, frames): AudioLDM's log-mel, which its VAE and HiFi-GAN take."""
        return torch.log(self.mel(wave).clamp(min=1e-5))

    def __call__(self, wave: ArrayLike) -> torch.Tensor:
        """The diffusion model's view of a waveform: normalize(log_mel(wave))."""
        return normalize(self.log_mel(wave))


#################################################################################
#                                    Vocoders                                   #
#################################################################################


class GriffinLim:
    """Log-mel -> waveform with no learned weights. The mel magnitude M = A S (A: the mel filters) is mapped back to
    a linear-frequency magnitude S >= 0 by non-negative least squares, solved with Lee & Seung's multiplicative
    updates S <- S * (A^T M) / (A^T A S), started from A^T M; then librosa's fast Griffin-Lim (momentum 0.99,
    Perraudin et al. 2013) finds a phase. Deterministic for a given seed. (librosa's own mel_to_stft NNLS stops
    at sparse, peaky solutions: on a synthesised melody Griffin-Lim then reaches a mel spectral convergence of
    0.15, against 0.05 from these updates, and it is far slower on noisy spectrograms.)"""

    name = "griffin-lim"

    def __init__(self, mel: MelSpectrogram, n_iter: int = 64, momentum: float = 0.99, seed: int = 0,
                 nnls_iter: int = 50):
        if n_iter < 1:
            raise ConfigError(f"griffin_lim_iters must be >= 1, got {n_iter}")
        self.front, self.n_iter, self.momentum, self.seed = mel, int(n_iter), float(momentum), int(seed)
        self.nnls_iter = int(nnls_iter)
        self.sample_rate = mel.sample_rate

    def linear_magnitude(self, log_mel: ArrayLike) -> np.ndarray:
        """(n_mels, frames) log-mel -> (n_fft // 2 + 1, frames) non-negative magnitude with A S ~ exp(log_mel)."""
        A = self.front.filters.double().numpy()
        m = np.exp(np.asarray(torch.as_tensor(log_mel).detach().cpu().double()))
        m = np.where(m <= 1e-5 * (1 + 1e-6), 0.0, m)  # the floor is "no energy", not 1e-5 of it
        atm = A.T @ m
        s = atm.copy()
        for _ in range(self.nnls_iter):
            s *= atm / np.maximum(A.T @ (A @ s), 1e-12)
        return s

    def __call__(self, log_mel: ArrayLike) -> torch.Tensor:
        """(n_mels, frames) or (N, n_mels, frames) -> (samples,) or (N, samples) float32 (not clipped: a
        spectrogram louder than full scale gives samples beyond [-1, 1]; `peak_limit` them before writing)."""
        import librosa

        log_mel = torch.as_tensor(log_mel)
        if log_mel.dim() == 3:
            return torch.stack([self(m) for m in log_mel])
        c = self.front.cfg
        mag = self.linear_magnitude(log_mel)
        wave = librosa.griffinlim(mag, n_iter=self.n_iter, hop_length=c.hop_length, win_length=c.win_length,
                                  n_fft=c.n_fft, window="hann", center=True, pad_mode="reflect",
                                  momentum=self.momentum, init="random", random_state=self.seed,
                                  length=self.front.num_samples(log_mel.shape[-1]))
        return torch.from_numpy(wave.astype(np.float32))


class HiFiGan:
    """An AudioLDM2 HiFi-GAN vocoder (`transformers.SpeechT5HifiGan`) loaded from a local folder."""

    name = "hifi-gan"

    def __init__(self, model, path: str = ""):
        self.model = model.eval().requires_grad_(False)
        self.path = str(path)
        self.sample_rate = int(model.config.sampling_rate)
        self.n_mels = int(model.config.model_in_dim)
        self.hop_length = int(np.prod(model.config.upsample_rates))

    @classmethod
    def from_pretrained(cls, path: str, subfolder: Optional[str] = None) -> "HiFiGan":
        from transformers import SpeechT5HifiGan

        folder = Path(os.path.expanduser(path)) / (subfolder or "")
        if not (folder / "config.json").is_file():
            raise ConfigError(f"no HiFi-GAN vocoder at '{folder}' (config.json missing): point the vocoder path at the "
                              "`vocoder` folder of a local AudioLDM2 copy (e.g. cvssp/audioldm2-music)")
        try:
            model = SpeechT5HifiGan.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as e:
            raise ConfigError(f"cannot load the HiFi-GAN vocoder from '{folder}' ({str(e).splitlines()[0]})") from None
        return cls(model, str(folder))

    def to(self, device) -> "HiFiGan":
        self.model.to(device)
        return self

    @torch.no_grad()
    def __call__(self, log_mel: ArrayLike) -> torch.Tensor:
        """(n_mels, frames) or (N, n_mels, frames) natural-log mel -> (samples,) or (N, samples) float32."""
        log_mel = torch.as_tensor(log_mel).float()
        if log_mel.shape[-2] != self.n_mels:
            raise ConfigError(f"the vocoder at '{self.path}' takes {self.n_mels} mel bins, got {log_mel.shape[-2]}")
        p = next(self.model.parameters())
        wave = self.model(log_mel.transpose(-1, -2).to(p.device, p.dtype))  # it reads (frames, n_mels)
        return wave.float().cpu()


def load_vocoder(spec: str, mel: MelSpectrogram, griffin_lim_iters: int = 64, seed: int = 0):
    """'griffin-lim' (no weights) or the path of a HiFi-GAN folder (an AudioLDM2 `vocoder/` folder, or the
    AudioLDM2 folder holding one)."""
    if spec in ("", "griffin-lim"):
        return GriffinLim(mel, n_iter=griffin_lim_iters, seed=seed)
    path = Path(os.path.expanduser(spec))
    sub = "vocoder" if (path / "vocoder" / "config.json").is_file() else None
    vocoder = HiFiGan.from_pretrained(str(path), sub)
    if vocoder.sample_rate != mel.sample_rate or vocoder.hop_length != mel.hop_length:
        raise ConfigError(f"the vocoder at '{spec}' makes {vocoder.sample_rate} Hz audio with hop {vocoder.hop_length}, "
                          f"the data uses {mel.sample_rate} Hz / hop {mel.hop_length}: use a matching vocoder or griffin-lim")
    return vocoder


#################################################################################
#                                   Files                                       #
#################################################################################


def read_wav(path: Union[str, os.PathLike], sample_rate: Optional[int] = None) -> tuple[np.ndarray, int]:
    """Any file soundfile reads (WAV, FLAC, OGG, ...) -> (mono float32 samples, rate). With `sample_rate`,
    the audio is resampled to it (soxr, through librosa)."""
    import soundfile as sf

    try:
        wave, sr = sf.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError) as e:
        raise ConfigError(f"cannot read audio file '{path}' ({str(e).splitlines()[0]})") from None
    wave = wave.mean(axis=1)  # mono: average the channels
    if sample_rate is not None and sr != sample_rate:
        import librosa

        wave = librosa.resample(wave, orig_sr=sr, target_sr=sample_rate).astype(np.float32)
        sr = sample_rate
    return wave, int(sr)


def peak_limit(wave: torch.Tensor, peak: float = 0.95) -> torch.Tensor:
    """Scale a waveform down (never up) so that its largest sample is at most `peak`: no clipping distortion."""
    top = float(wave.abs().max()) if wave.numel() else 0.0
    return wave * (peak / top) if top > peak else wave


def write_wav(path: Union[str, os.PathLike], wave: ArrayLike, sample_rate: int) -> None:
    """Mono float samples in [-1, 1] -> 16-bit PCM WAV, written atomically."""
    import soundfile as sf

    arr = np.asarray(torch.as_tensor(wave).detach().cpu().float()).reshape(-1)
    with atomic_path(path) as tmp:
        sf.write(str(tmp), np.clip(arr, -1.0, 1.0), int(sample_rate), subtype="PCM_16", format="WAV")


# A perceptually ordered dark-to-bright palette (anchors of matplotlib's "magma").
_MAGMA = np.array([[0, 0, 4], [28, 16, 68], [79, 18, 123], [129, 37, 129], [181, 54, 122], [229, 80, 100],
                   [251, 135, 97], [254, 194, 135], [252, 253, 191]], dtype=np.float64)


def spectrogram_rgb(x: ArrayLike, vmin: float = -1.0, vmax: float = 1.0, scale: int = 1) -> np.ndarray:
    """(n_mels, frames) values (normalised log-mel by default range) -> uint8 RGB (H, W, 3), low frequencies at
    the bottom, `scale` x nearest-neighbour enlarged."""
    a = np.asarray(torch.as_tensor(x).detach().cpu().float())
    if a.ndim != 2:
        raise ValueError(f"expected a (n_mels, frames) spectrogram, got shape {a.shape}")
    u = np.clip((a[::-1] - vmin) / (vmax - vmin), 0.0, 1.0) * (len(_MAGMA) - 1)
    lo = np.floor(u).astype(int).clip(0, len(_MAGMA) - 2)
    frac = (u - lo)[..., None]
    rgb = _MAGMA[lo] * (1 - frac) + _MAGMA[lo + 1] * frac
    rgb = rgb.round().astype(np.uint8)
    return rgb.repeat(scale, axis=0).repeat(scale, axis=1) if scale > 1 else rgb


def save_spectrogram_png(x: ArrayLike, path: Union[str, os.PathLike], vmin: float = -1.0, vmax: float = 1.0,
                         scale: int = 1) -> None:
    """Write a spectrogram picture (see `spectrogram_rgb`) atomically."""
    from PIL import Image

    with atomic_path(path) as tmp:
        Image.fromarray(spectrogram_rgb(x, vmin, vmax, scale)).save(tmp, format="PNG")
