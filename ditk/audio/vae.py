"""FluxMusic's codec: the AudioLDM2 mel VAE (a diffusers `AutoencoderKL`, 1 -> 8 channels, 4x smaller in time
and frequency) and its HiFi-GAN vocoder, both loaded from a local copy of an AudioLDM2 pipeline folder
(`vae/`, `vocoder/`; e.g. cvssp/audioldm2-music fetched once on a machine with internet).

`audioldm2-vae` follows ditk's autoencoder API on ditk's spectrogram tensors: encode(x) takes normalised
log-mel (N, 1, n_mels, frames) (ditk.audio.mel.normalize), undoes the normalisation (the VAE was trained on
AudioLDM's natural-log mel), transposes to the VAE's (N, 1, frames, n_mels) layout and returns
`latent * scale_factor` back in ditk's layout (N, 8, n_mels / 4, frames / 4); decode inverts it. FluxMusic
scales by `vae.config.scaling_factor` (scale_factor: 0 here means exactly that).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import ConfigError
from ..registry import AUTOENCODERS
from .mel import HiFiGan, denormalize, normalize

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class AudioLDM2VAEConfig:
    path: str = ""  # local AudioLDM2 pipeline folder (holding vae/ and vocoder/), or a VAE folder itself
    subfolder: Optional[str] = "vae"  # the VAE inside `path` (null: `path` is the VAE folder)
    scale_factor: float = 0.0  # 0: the VAE config's scaling_factor (what FluxMusic uses)
    sample_posterior: bool = True  # FluxMusic's train.py draws latent_dist.sample()
    vocoder: str = ""  # HiFi-GAN folder; "": <path>/vocoder when it exists, else the data set's vocoder setting
    dtype: str = "float32"


class MelVAE:
    name = "audioldm2-vae"

    def __init__(self, vae, path: str = "", scale_factor: float = 0.0, sample_posterior: bool = True,
                 vocoder: Optional[HiFiGan] = None):
        self.vae = vae.eval().requires_grad_(False)
        self.path = str(path)
        self.scale_factor = float(scale_factor or vae.config.scaling_factor)
        self.sample_posterior = bool(sample_posterior)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)
        self.vocoder = vocoder

    def to(self, device) -> "MelVAE":
        self.vae.to(device)
        if self.vocoder is not None:
            self.vocoder.to(device)
        return self

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def latent_channels(self, in_channels: int) -> int:
        if in_channels != self.vae.config.in_channels:
            raise ConfigError(f"the VAE at '{self.path}' takes {self.vae.config.in_channels}-channel spectrograms, the data "
                              f"has {in_channels}")
        return int(self.vae.config.latent_channels)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Normalised log-mel (N, 1, n_mels, frames) -> scaled latents (N, C, n_mels / f, frames / f), float32."""
        mel = denormalize(x.float()).transpose(-1, -2)  # AudioLDM's (N, 1, frames, n_mels) natural-log mel
        posterior = self.vae.encode(mel.to(self.device, self.dtype)).latent_dist
        z = posterior.sample(generator=generator) if self.sample_posterior else posterior.mode()
        return (z.float() * self.scale_factor).transpose(-1, -2)

    @torch.no_grad()
    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Normalised log-mel -> the posterior's (mean, std), unscaled, in ditk's (N, C, n_mels / f, frames / f)."""
        mel = denormalize(x.float()).transpose(-1, -2)
        d = self.vae.encode(mel.to(self.device, self.dtype)).latent_dist
        return d.mean.transpose(-1, -2), d.std.transpose(-1, -2)

    def posterior_noise(self, shape, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """encode's draw: made in the VAE's (time, mel) layout, returned in ditk's (the same numbers as encode)."""
        *lead, h, w = tuple(shape)
        return torch.randn((*lead, w, h), generator=generator, dtype=self.dtype).transpose(-1, -2)

    def from_posterior(self, mean: torch.Tensor, std: torch.Tensor, eps: Optional[torch.Tensor]) -> torch.Tensor:
        """(mean + std * eps) * scale as float32 (eps None: the mean), in ditk's layout."""
        z = mean if eps is None else mean + std * eps.to(mean.device, mean.dtype)
        return z.float() * self.scale_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> normalised log-mel (N, 1, n_mels, frames), float32."""
        lat = (z.float() / self.scale_factor).transpose(-1, -2)
        mel = self.vae.decode(lat.to(self.device, self.dtype)).sample.float()
        return normalize(mel.transpose(-1, -2))


@AUTOENCODERS.register("audioldm2-vae", config=AudioLDM2VAEConfig)
def build_audioldm2_vae(cfg) -> MelVAE:
    """AudioLDM2 mel VAE (+ its HiFi-GAN vocoder) from a local folder: FluxMusic's latent space."""
    from diffusers import AutoencoderKL

    path = os.path.expanduser(str(cfg.path or ""))
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"autoencoder.dtype '{cfg.dtype}' is not one of {', '.join(DTYPES)}")
    folder = os.path.join(path, cfg.subfolder or "")
    if not path or not os.path.isfile(os.path.join(folder, "config.json")):
        raise ConfigError(f"autoencoder.path '{cfg.path}' holds no AudioLDM2 VAE ({os.path.join(cfg.subfolder or '', 'config.json')} "
                          "missing): set it to a local copy of an AudioLDM2 pipeline folder, e.g. cvssp/audioldm2-music")
    try:
        vae = AutoencoderKL.from_pretrained(path, subfolder=cfg.subfolder or None, torch_dtype=DTYPES[cfg.dtype],
                                            local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load the AudioLDM2 VAE from '{folder}' ({str(e).splitlines()[0]})") from None
    voc_path = cfg.vocoder or (os.path.join(path, "vocoder") if os.path.isfile(os.path.join(path, "vocoder", "config.json")) else "")
    vocoder = HiFiGan.from_pretrained(voc_path) if voc_path else None
    return MelVAE(vae, path, cfg.scale_factor, cfg.sample_posterior, vocoder)
