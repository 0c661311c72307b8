"""Where diffusion happens: pixel space (`identity`) or a VAE's latent space (`autoencoder-kl`).

Every autoencoder maps images in [-1, 1] to the tensors the diffusion model sees and back:
    encode(x, generator=None) -> z      decode(z) -> x      latent_channels(c)      downsample      .to(device)
plus `name`, `path` and `scale_factor`, which ditk records next to pre-encoded latents and checkpoints.
A VAE also splits `encode` into its two halves, so that the posterior can be computed once and sampled at
every step (ditk.data.latents' moments cache):
    posterior(x) -> (mean, std)         the Gaussian posterior's moments, unscaled, in ditk's layout
    posterior_noise(shape, generator)   the standard normal draw `encode` adds, in ditk's layout
    from_posterior(mean, std, eps)      -> (mean + std * eps - shift) * scale  (eps None: the mean)
so that encode(x, g) == from_posterior(*posterior(x), posterior_noise(shape, g)), bit for bit.

DiT trains on `vae.encode(x).latent_dist.sample() * 0.18215` from stabilityai/sd-vae-ft-{ema,mse} and
samples through `vae.decode(z / 0.18215)`; `autoencoder-kl` does exactly that, for any diffusers
AutoencoderKL, with the posterior draw taken from an explicit generator so encoding is reproducible.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from typing import Optional

import torch

from .errors import ConfigError
from .registry import AUTOENCODERS

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class IdentityConfig:
    pass


@dataclass
class AutoencoderKLConfig:
    path: str = ""  # local folder of a diffusers AutoencoderKL (config.json + weights), or a cached hub id
    scale_factor: float = 0.18215  # SD 1.x VAEs (DiT); SDXL VAE: 0.13025
    shift_factor: float = 0.0  # z = (latent - shift) * scale; 0 for SD VAEs (Flux/SD3 VAEs use one)
    sample_posterior: bool = True  # DiT's train.py draws .sample(); false uses the posterior mean
    subfolder: Optional[str] = None  # e.g. "vae" inside a full pipeline folder
    dtype: str = "float32"  # float32 | float16 | bfloat16 (SD VAEs overflow in float16 decode)


class Identity:
    """Pixel-space diffusion: the model sees the images themselves."""

    name = "identity"
    path = ""
    scale_factor = 1.0
    downsample = 1

    def encode(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        return x

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return z

    def latent_channels(self, in_channels: int) -> int:
        return in_channels

    def to(self, device) -> "Identity":
        return self


@AUTOENCODERS.register("identity", config=IdentityConfig)
def build_identity(cfg=None) -> Identity:
    """Pixel space: encode and decode are the identity."""
    return Identity()


class KLAutoencoder:
    """A frozen diffusers AutoencoderKL with latent scaling (and optional shift)."""

    name = "autoencoder-kl"

    def __init__(self, vae, path: str = "", scale_factor: float = 0.18215, shift_factor: float = 0.0,
                 sample_posterior: bool = True):
        self.vae = vae.eval().requires_grad_(False)
        self.path = str(path)
        self.scale_factor = float(scale_factor)
        self.shift_factor = float(shift_factor)
        self.sample_posterior = bool(sample_posterior)
        # each down block but the last halves the resolution (diffusers Encoder)
        self.downsample = 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def device(self) -> torch.device:
        return next(self.vae.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.vae.parameters()).dtype

    def to(self, device) -> "KLAutoencoder":
        self.vae.to(device)
        return self

    def latent_channels(self, in_channels: int) -> int:
        if in_channels != self.vae.config.in_channels:
            raise ConfigError(
                f"the autoencoder at '{self.path}' takes {self.vae.config.in_channels}-channel images, "
                f"the data has {in_channels}: pick a matching autoencoder or autoencoder.name=identity"
            )
        return int(self.vae.config.latent_channels)

    @torch.no_grad()
    def encode(self, x: torch.Tensor, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """Images in [-1, 1] -> scaled latents (float32, on the VAE's device)."""
        posterior = self.vae.encode(x.to(self.device, self.dtype)).latent_dist
        z = posterior.sample(generator=generator) if self.sample_posterior else posterior.mode()
        return ((z.float() - self.shift_factor) * self.scale_factor)

    @torch.no_grad()
    def posterior(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images -> the posterior's (mean, std), unscaled, in the VAE's dtype: DiagonalGaussianDistribution's
        own tensors (std = exp(0.5 * clamp(logvar, -30, 20)))."""
        d = self.vae.encode(x.to(self.device, self.dtype)).latent_dist
        return d.mean, d.std

    def posterior_noise(self, shape, generator: Optional[torch.Generator] = None) -> torch.Tensor:
        """The draw DiagonalGaussianDistribution.sample makes (diffusers' randn_tensor: on the CPU for a CPU
        generator, in the VAE's dtype), on the CPU."""
        return torch.randn(tuple(shape), generator=generator, dtype=self.dtype)

    def from_posterior(self, mean: torch.Tensor, std: torch.Tensor, eps: Optional[torch.Tensor]) -> torch.Tensor:
        """(mean + std * eps - shift) * scale as float32; eps None: the posterior mean (sample_posterior=false)."""
        z = mean if eps is None else mean + std * eps.to(mean.device, mean.dtype)
        return (z.float() - self.shift_factor) * self.scale_factor

    @torch.no_grad()
    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """Scaled latents -> images (float32, nominally in [-1, 1]; not clamped)."""
        z = z.float() / self.scale_factor + self.shift_factor
        return self.vae.decode(z.to(self.device, self.dtype)).sample.float()


def _missing(path: str, why: str) -> ConfigError:
    return ConfigError(
        f"autoencoder.path '{path}' {why}: it must be a local folder of a diffusers AutoencoderKL "
        "(config.json + diffusion_pytorch_model.safetensors); get one on a machine with internet, e.g. "
        "`huggingface-cli download stabilityai/sd-vae-ft-ema --local-dir sd-vae-ft-ema`, and copy it here"
    )


@AUTOENCODERS.register("autoencoder-kl", config=AutoencoderKLConfig)
def build_autoencoder_kl(cfg) -> KLAutoencoder:
    """A diffusers AutoencoderKL from a local folder (e.g. stabilityai/sd-vae-ft-ema), scaled latents."""
    from diffusers import AutoencoderKL

    path = str(cfg.path or "")
    if cfg.dtype not in DTYPES:
        raise ConfigError(f"autoencoder.dtype '{cfg.dtype}' is not one of {', '.join(DTYPES)}")
    if not path:
        raise _missing(path, "is not set")
    folder = os.path.join(os.path.expanduser(path), cfg.subfolder or "")
    if os.path.isdir(os.path.expanduser(path)):
        if not os.path.isfile(os.path.join(folder, "config.json")):
            raise _missing(path, f"has no {os.path.join(cfg.subfolder or '', 'config.json')}")
        source = os.path.expanduser(path)
    elif re.fullmatch(r"[\w-][\w.-]*/[\w.-]+", path):
        source = path  # an `org/name` hub id: only the local Hugging Face cache is consulted (no network)
    else:
        raise _missing(path, "does not exist")
    try:
        with warnings.catch_warnings():  # huggingface_hub's deprecation notice about an argument diffusers passes
            warnings.filterwarnings("ignore", message=".*local_dir_use_symlinks.*")
            vae = AutoencoderKL.from_pretrained(
                source, subfolder=cfg.subfolder, torch_dtype=DTYPES[cfg.dtype], local_files_only=True
            )
    except (OSError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise _missing(path, f"could not be loaded ({first})") from e
    return KLAutoencoder(vae, path, cfg.scale_factor, cfg.shift_factor, cfg.sample_posterior)
