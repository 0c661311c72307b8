"""Autoencoders: identity, and diffusers AutoencoderKL loaded from a local folder with DiT's scaling."""

import pytest
import torch
from omegaconf import OmegaConf

from ditk.autoencoders import AutoencoderKLConfig
from ditk.errors import ConfigError
from ditk.registry import AUTOENCODERS


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16), layers_per_block=1,
        latent_channels=4, norm_num_groups=4, sample_size=16,
    )
    folder = tmp_path_factory.mktemp("vae") / "tiny-vae"
    vae.save_pretrained(folder)
    return folder, vae.eval()


def images(n=2, size=16, seed=0):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_identity():
    ae = AUTOENCODERS.build("identity", None)
    x = images()
    assert ae.encode(x) is x and ae.decode(x) is x
    assert ae.latent_channels(3) == 3 and ae.downsample == 1 and ae.to("cpu") is ae and ae.scale_factor == 1.0


def test_kl_shapes_and_scaling_against_diffusers(vae_dir):
    folder, vae = vae_dir
    cfg = OmegaConf.structured(AutoencoderKLConfig(path=str(folder), sample_posterior=False))
    ae = AUTOENCODERS.build("autoencoder-kl", cfg)
    assert ae.downsample == 2 and ae.latent_channels(3) == 4 and ae.scale_factor == 0.18215
    x = images()
    z = ae.encode(x)
    assert z.shape == (2, 4, 8, 8) and z.dtype == torch.float32
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
        torch.testing.assert_close(z, mean * 0.18215)
        out = ae.decode(z)
        torch.testing.assert_close(out, vae.decode(mean * 0.18215 / 0.18215).sample)
    assert out.shape == x.shape


def test_kl_posterior_sample_uses_the_generator(vae_dir):
    folder, vae = vae_dir
    ae = AUTOENCODERS.build("autoencoder-kl", AutoencoderKLConfig(path=str(folder), scale_factor=0.5))
    x = images(seed=1)
    z1 = ae.encode(x, generator=torch.Generator().manual_seed(3))
    z2 = ae.encode(x, generator=torch.Generator().manual_seed(3))
    z3 = ae.encode(x, generator=torch.Generator().manual_seed(4))
    assert z1.equal(z2) and not z1.equal(z3)
    with torch.no_grad():
        post = vae.encode(x).latent_dist
        torch.testing.assert_close(z1, post.sample(generator=torch.Generator().manual_seed(3)) * 0.5)
    torch.testing.assert_close(ae.decode(z1), vae.decode(z1 / 0.5).sample)


def test_kl_shift_and_subfolder_and_dtype(vae_dir, tmp_path):
    folder, vae = vae_dir
    pipeline = tmp_path / "pipe"
    vae.save_pretrained(pipeline / "vae")
    ae = AUTOENCODERS.build(
        "autoencoder-kl",
        AutoencoderKLConfig(path=str(pipeline), subfolder="vae", sample_posterior=False, scale_factor=2.0, shift_factor=0.1),
    )
    x = images(seed=2)
    with torch.no_grad():
        mean = vae.encode(x).latent_dist.mean
    torch.testing.assert_close(ae.encode(x), (mean - 0.1) * 2.0)
    bf = AUTOENCODERS.build("autoencoder-kl", AutoencoderKLConfig(path=str(folder), dtype="bfloat16", sample_posterior=False))
    assert bf.dtype == torch.bfloat16 and bf.encode(x).dtype == torch.float32
    torch.testing.assert_close(bf.encode(x), mean * 0.18215, atol=0.05, rtol=0.05)


def test_kl_errors(vae_dir, tmp_path):
    folder, _ = vae_dir
    with pytest.raises(ConfigError) as e:
        AUTOENCODERS.build("autoencoder-kl", AutoencoderKLConfig(path=str(tmp_path / "sd-vae-ft-ema")))
    msg = str(e.value)
    assert "\n" not in msg and "sd-vae-ft-ema" in msg and "config.json" in msg and "huggingface-cli download" in msg
    with pytest.raises(ConfigError) as e:
        AUTOENCODERS.build("autoencoder-kl", AutoencoderKLConfig())
    assert "not set" in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError) as e:
        AUTOENCODERS.build("autoencoder-kl", AutoencoderKLConfig(path=str(tmp_path / "empty")))
    assert "has no config.json" in str(e.value)
    with pytest.raises(ConfigError) as e:  # a hub id that is not in the local cache: no network is tried
        AUTOENCODERS.build("autoencoder-kl", AutoencoderKLConfig(path="no-such-org/no-such-vae"))
    assert "\n" not in str(e.value) and "could not be loaded" in str(e.value)
    with pytest.raises(ConfigError):
        AUTOENCODERS.build("autoencoder-kl", AutoencoderKLConfig(path=str(folder), dtype="float64"))
    ae = AUTOENCODERS.build("autoencoder-kl", AutoencoderKLConfig(path=str(folder)))
    with pytest.raises(ConfigError):
        ae.latent_channels(1)
