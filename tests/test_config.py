"""Presets, base chains, overrides and schema validation."""

import pytest

from ditk.config import load_preset, preset_names, resolve
from ditk.errors import ConfigError


def test_shipped_presets_cover_the_dit_family():
    names = preset_names()
    expected = {f"dit-{s}-{p}" for s in ("s", "b", "l", "xl") for p in (2, 4, 8)} | {"dit-xl-2-512", "digits-dit"}
    assert expected <= set(names)
    assert not any(n.startswith("_") for n in names)  # bases are hidden


def test_base_chain_and_paper_hyperparameters():
    cfg = resolve("dit-xl-2-512", allow_missing=("data", "autoencoder"))
    assert (cfg.model.depth, cfg.model.hidden_size, cfg.model.num_heads, cfg.model.patch_size) == (28, 1152, 16, 2)
    assert cfg.model.input_size == 64 and cfg.data.image_size == 512  # 512 overrides the 256 base
    assert cfg.optim.lr == 1e-4 and cfg.optim.weight_decay == 0.0 and cfg.train.global_batch_size == 256
    assert cfg.train.ema_decay == 0.9999 and cfg.autoencoder.scale_factor == 0.18215
    assert cfg.objective.name == "ddpm" and cfg.objective.variance == "learned_range"
    assert cfg.run.name == "dit-xl-2-512"


def test_overrides_are_typed():
    cfg = resolve("digits-dit", ["model.depth=4", "optim.lr=2e-4", "sample.cfg_scale=3"])
    assert cfg.model.depth == 4 and isinstance(cfg.model.depth, int)
    assert cfg.optim.lr == pytest.approx(2e-4) and cfg.sample.cfg_scale == 3.0


@pytest.mark.parametrize("overrides, message", [
    (["model.dpth=4"], "unknown key 'model.dpth': did you mean 'model.depth'?"),
    (["optim.lrr=1"], "did you mean 'optim.lr'?"),
    (["modl.depth=4"], "unknown config section 'modl': did you mean 'model'?"),
    (["model.depth=abc"], "bad value for 'model.depth'"),
    (["model.name=ditt"], "unknown model 'ditt': did you mean 'dit'?"),
    (["depth"], "is not of the form key=value"),
])
def test_bad_overrides_are_one_line_errors(overrides, message):
    with pytest.raises(ConfigError) as info:
        resolve("digits-dit", overrides)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_unknown_preset_suggests_the_closest():
    with pytest.raises(ConfigError, match="did you mean 'dit-xl-2'"):
        resolve("dit-xl2")


def test_required_value_missing_names_the_key():
    with pytest.raises(ConfigError, match=r"missing required key 'data.path'"):
        resolve("dit-s-2", ["autoencoder.path=/x"])


def test_user_preset_file_extends_a_shipped_one(tmp_path):
    (tmp_path / "mine.yaml").write_text("base: digits-dit\nmodel:\n  depth: 3\n")
    (tmp_path / "child.yaml").write_text("base: mine.yaml\ntrain:\n  max_steps: 7\n")
    cfg = resolve(str(tmp_path / "child.yaml"))
    assert cfg.model.depth == 3 and cfg.train.max_steps == 7 and cfg.model.hidden_size == 96
    assert cfg.run.name == "child"


def test_base_cycle_is_an_error(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="extends itself"):
        load_preset(str(tmp_path / "a.yaml"))


def test_resolved_config_round_trips(tmp_path):
    from ditk.config import load_run_config, to_yaml

    cfg = resolve("digits-dit", ["model.depth=3"])
    (tmp_path / "config.yaml").write_text(to_yaml(cfg))
    assert load_run_config(tmp_path) == cfg
