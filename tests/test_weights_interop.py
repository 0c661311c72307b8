"""Weight interop: diffusers DiTTransformer2DModel -> ditk DiT (exact outputs), official `.pt` and ditk
`.safetensors` round trips, and the one-line errors for bad files."""

import argparse
import json

import pytest
import torch
from diffusers import DiTTransformer2DModel
from diffusers.models.embeddings import get_timestep_embedding
from safetensors.torch import save_file

from ditk.errors import ConfigError
from ditk.models.convert import (
    dit_config_from_diffusers,
    dit_from_diffusers,
    load_diffusers,
    load_pretrained,
    read_official,
)
from ditk.models.dit import DiT, DiTConfig, build_dit
from ditk.models.layers import timestep_embedding

DIFFUSERS_TINY = dict(
    sample_size=8, patch_size=2, in_channels=4, out_channels=8, num_layers=2,
    num_attention_heads=2, attention_head_dim=16, num_embeds_ada_norm=10,
)  # fmt: skip


def random_diffusers(seed=0, **overrides):
    """A tiny diffusers DiT with EVERY weight random (its adaLN and output layers start at zero otherwise,
    which would hide mistakes in their mapping) and, as in converted DiT checkpoints, the same timestep/class
    embedder in every block."""
    torch.manual_seed(seed)
    model = DiTTransformer2DModel(**{**DIFFUSERS_TINY, **overrides}).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)
        shared = model.transformer_blocks[0].norm1.emb.state_dict()
        for block in model.transformer_blocks[1:]:
            block.norm1.emb.load_state_dict(shared)
    assert all(p.abs().min() > 0 for p in model.parameters())
    return model


def batch(n=4, size=8):
    g = torch.Generator().manual_seed(7)
    x = torch.randn(n, 4, size, size, generator=g)
    t = torch.tensor([0.0, 1.0, 250.0, 999.0])[:n]
    y = torch.tensor([0, 3, 9, 10])[:n]  # 10 = the null (CFG) label
    return x, t, y


def diffusers_out(model, x, t, y):
    with torch.no_grad():
        return model(x, timestep=t, class_labels=y).sample


def ditk_out(model, x, t, y):
    with torch.no_grad():
        return model.eval()(x, t, y)


def test_config_from_diffusers():
    cfg = dit_config_from_diffusers(random_diffusers().config)
    assert cfg == DiTConfig(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2,
                            mlp_ratio=4.0, num_classes=10, class_dropout_prob=0.1, learn_sigma=True)  # fmt: skip
    assert not dit_config_from_diffusers({**DIFFUSERS_TINY, "out_channels": None}).learn_sigma
    with pytest.raises(ConfigError, match="out_channels"):
        dit_config_from_diffusers({**DIFFUSERS_TINY, "out_channels": 5})
    with pytest.raises(ConfigError, match="activation_fn"):
        dit_config_from_diffusers({**DIFFUSERS_TINY, "activation_fn": "geglu"})


def test_converted_model_reproduces_diffusers_exactly():
    ref = random_diffusers()
    x, t, y = batch()
    expected = diffusers_out(ref, x, t, y)
    ours = ditk_out(dit_from_diffusers(ref, match_diffusers=True), x, t, y)
    assert expected.abs().max() > 1.0  # a non-trivial output
    torch.testing.assert_close(ours, expected, rtol=0, atol=1e-5)


def test_default_conversion_keeps_dit_function():
    """Same weights, DiT's function: equal to diffusers once diffusers uses DiT's timestep frequencies and eps."""
    ref = random_diffusers(norm_eps=1e-6)  # DiT's second LayerNorm eps
    x, t, y = batch()
    stock = diffusers_out(ref, x, t, y)
    for block in ref.transformer_blocks:
        block.norm1.emb.time_proj.downscale_freq_shift = 0  # DiT/GLIDE: 10000^(-i/128), not 10000^(-i/127)
    dit_like = diffusers_out(ref, x, t, y)
    ours = ditk_out(dit_from_diffusers(ref), x, t, y)
    torch.testing.assert_close(ours, dit_like, rtol=0, atol=1e-5)
    assert (ours - stock).abs().max() > 1e-2  # the frequency difference is real, not a rounding effect


def test_timestep_embedding_vs_diffusers():
    t = torch.tensor([0.0, 3.0, 500.0, 999.0])
    dit = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=0)
    port = get_timestep_embedding(t, 256, flip_sin_to_cos=True, downscale_freq_shift=1)  # diffusers' DiT
    torch.testing.assert_close(timestep_embedding(t, 256), dit, rtol=0, atol=1e-6)
    torch.testing.assert_close(timestep_embedding(t, 256, freq_shift=1), port, rtol=0, atol=1e-6)
    assert (dit - port).abs().max() > 0.1


def test_diffusers_folder_and_pipeline_folder(tmp_path):
    ref = random_diffusers()
    ref.save_pretrained(tmp_path / "transformer")
    x, t, y = batch()
    expected = ditk_out(dit_from_diffusers(ref), x, t, y)
    for folder in (tmp_path / "transformer", tmp_path):
        if folder == tmp_path:
            (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "DiTPipeline"}))
        model = load_pretrained(build_dit(dit_config_from_diffusers(ref.config)), folder)
        assert torch.equal(ditk_out(model, x, t, y), expected)


def test_untied_diffusers_embedders_are_refused():
    ref = random_diffusers()
    with torch.no_grad():
        ref.transformer_blocks[1].norm1.emb.timestep_embedder.linear_1.bias.add_(1.0)
    with pytest.raises(ConfigError, match="t_embedder.mlp.0.bias"):
        dit_from_diffusers(ref)


def test_official_format_round_trip(tmp_path):
    ref = random_diffusers()
    source = dit_from_diffusers(ref)
    sd = {k: v.clone() for k, v in source.state_dict().items()}
    x, t, y = batch()
    expected = ditk_out(source, x, t, y)
    # A released checkpoint (a dict with "ema") and a DiT train.py checkpoint (with argparse args and optimizer).
    torch.save({"ema": sd}, tmp_path / "ema.pt")
    train = {
        "model": {k: torch.zeros_like(v) for k, v in sd.items()},
        "ema": sd,
        "opt": {"state": {}, "param_groups": []},
        "args": argparse.Namespace(model="DiT-XL/2", image_size=256),
    }
    torch.save(train, tmp_path / "0050000.pt")
    torch.save(sd, tmp_path / "raw.pth")
    for name in ("ema.pt", "0050000.pt", "raw.pth"):
        model = load_pretrained(build_dit(dit_config_from_diffusers(ref.config)), tmp_path / name)
        assert torch.equal(ditk_out(model, x, t, y), expected), name
    # strict: the loaded state dict is exactly the model's
    assert read_official(tmp_path / "ema.pt").keys() == source.state_dict().keys()


def test_ditk_safetensors_round_trip(tmp_path):
    source = dit_from_diffusers(random_diffusers())
    save_file(source.state_dict(), tmp_path / "model.safetensors")
    model = load_pretrained(build_dit(dit_config_from_diffusers(DIFFUSERS_TINY)), tmp_path / "model.safetensors")
    x, t, y = batch()
    assert torch.equal(ditk_out(model, x, t, y), ditk_out(source, x, t, y))


class _Payload:
    """Unpickling this would create a file: proof that loading never executes pickled code."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_errors_are_one_line_with_the_fix(tmp_path):
    small = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    torch.save({"ema": small.state_dict()}, tmp_path / "small.pt")

    def error(model, path):
        with pytest.raises(ConfigError) as info:
            load_pretrained(model, path)
        message = str(info.value)
        assert "\n" not in message
        return message

    bigger = DiT(input_size=16, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2, num_classes=10)
    msg = error(bigger, tmp_path / "small.pt")
    assert "'pos_embed' has shape (1, 16, 32) in the checkpoint but (1, 64, 32)" in msg and "model.input_size=8" in msg
    deeper = DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2, num_classes=10)
    msg = error(deeper, tmp_path / "small.pt")
    assert "lacks 'blocks.2." in msg and "model.depth=2" in msg
    assert "does not exist" in error(small, tmp_path / "missing.pt")
    (tmp_path / "weights.onnx").write_bytes(b"")
    assert "unknown checkpoint type" in error(small, tmp_path / "weights.onnx")
    with pytest.raises(ConfigError, match="num_heads=2"):
        four_heads = DiT(**{**vars(dit_config_from_diffusers(DIFFUSERS_TINY)), "num_heads": 4})
        load_diffusers(four_heads, random_diffusers())

    marker = tmp_path / "pwned"
    torch.save({"ema": small.state_dict(), "evil": _Payload(str(marker))}, tmp_path / "evil.pt")
    assert "pickled io.open" in error(small, tmp_path / "evil.pt")
    assert not marker.exists()
    (tmp_path / "garbage.pt").write_bytes(b"not a checkpoint")
    (tmp_path / "garbage.safetensors").write_bytes(b"not a checkpoint")
    assert "not a readable PyTorch checkpoint" in error(small, tmp_path / "garbage.pt")
    assert "not a readable safetensors file" in error(small, tmp_path / "garbage.safetensors")
