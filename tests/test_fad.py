"""The audio FAD: `ditk evaluate-fid --modality audio GEN REF --features <a-jepa run>`."""

import json

import numpy as np
import pytest
import torch

from ditk.audio.mel import write_wav
from ditk.metrics import audio, stats as stats_io
from ditk_testing import invoke_ditk

N_CLIPS = 48  # windows per set: more than the 16-d features, so the covariances are not singular
# A tiny A-JEPA on 0.24 s clips (32 mel bins x 16 frames at hop 256, 4 x 4 patches: an 8 x 4 grid), 2 steps.
RUN = ["model.input_size=32", "model.frames=16", "model.patch_size=4", "model.hidden_size=16", "model.depth=1",
       "model.num_heads=2", "model.predictor_hidden_size=16", "model.predictor_depth=1", "model.predictor_num_heads=2",
       "data.num_clips=8", "data.frames=16", "data.n_mels=32", "data.hop_length=256", "train.global_batch_size=8",
       "train.max_steps=2", "optim.warmup_steps=0"]


def _music(seed, n):
    from ditk.registry import DATASETS

    cfg = DATASETS.get("music").config(num_clips=n, frames=16, n_mels=32, hop_length=256, seed=seed)
    return DATASETS.build("music", cfg)


def _write(folder, waves):
    folder.mkdir(parents=True)
    for i, w in enumerate(waves):
        write_wav(folder / f"{i:03d}.wav", w, 16000)
    return folder


@pytest.fixture(scope="module")
def audio_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("fad")
    invoke_ditk("train", "a-jepa-tiny", *RUN, f"run.dir={root}", "--no-progress", check=True)
    ref, real = _music(1, N_CLIPS), _music(2, N_CLIPS)  # two disjoint held-out draws of the synthesiser
    samples = ref.front.num_samples(16)
    rng = np.random.default_rng(0)
    return {
        "run": root / "a-jepa-tiny",
        "ref": _write(root / "ref", [ref.waveform(i) for i in range(N_CLIPS)]),
        "real": _write(root / "real", [real.waveform(i) for i in range(N_CLIPS)]),
        "noise": _write(root / "noise", [(0.1 * rng.standard_normal(samples)).astype(np.float32)
                                         for _ in range(N_CLIPS)]),
        "root": root,
    }


def _fad(*args):
    proc = invoke_ditk("evaluate-fid", "--modality", "audio", *map(str, args), "--no-progress")
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout)


def test_fad_of_real_against_real_is_far_below_real_against_noise(audio_sets, tmp_path):
    s = audio_sets
    real = _fad(s["real"], s["ref"], "--features", s["run"], "--cache-dir", tmp_path)
    noise = _fad(s["noise"], s["ref"], "--features", s["run"], "--cache-dir", tmp_path)
    assert real["fad"] < noise["fad"] / 20, (real["fad"], noise["fad"])
    assert real["modality"] == "audio" and real["feature_extractor"] == "a-jepa" and real["feature_dim"] == 16
    assert real["n_gen"] == real["n_ref"] == N_CLIPS and real["gen_files"] == N_CLIPS  # one window per clip
    assert real["front_end"]["hop_length"] == 256 and real["checkpoint"] == "step-000002"
    assert not real["ref_stats_cache_hit"] and noise["ref_stats_cache_hit"]  # REF embedded once
    same = _fad(s["ref"], s["ref"], "--features", s["run"], "--no-cache")
    assert abs(same["fad"]) < 1e-6


def test_out_file_saved_statistics_and_stats_as_reference(audio_sets, tmp_path):
    s = audio_sets
    first = _fad(s["real"], s["ref"], "--features", s["run"], "--no-cache", "--out", tmp_path / "r.json",
                 "--save-stats", tmp_path / "ref.npz")
    assert json.loads((tmp_path / "r.json").read_text()) == first
    again = _fad(s["real"], tmp_path / "ref.npz", "--features", s["run"], "--no-cache")
    assert again["fad"] == pytest.approx(first["fad"], rel=1e-6, abs=1e-9)
    saved = stats_io.load(tmp_path / "ref.npz")
    assert saved.meta["extractor"] == "a-jepa" and saved.meta["mode"] == "audio" and saved.meta["files"] == N_CLIPS
    # one input + --save-stats writes that input's statistics
    only = _fad(s["real"], "--features", s["run"], "--save-stats", tmp_path / "real.npz")
    assert only["n"] == N_CLIPS and (tmp_path / "real.npz").is_file()
    # two statistics files need no feature network
    pair = _fad(tmp_path / "real.npz", tmp_path / "ref.npz")
    assert pair["fad"] == pytest.approx(first["fad"], rel=1e-6, abs=1e-9)


def test_fad_of_statistics_files_is_the_closed_form(tmp_path):
    """Diagonal Gaussians: FAD = |mu1 - mu2|^2 + sum(s1 + s2 - 2 sqrt(s1 s2)), computed in float64."""
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    s1, s2 = rng.uniform(0.5, 2.0, 6), rng.uniform(0.5, 2.0, 6)
    meta = {"extractor": "a-jepa", "mode": "audio", "weights_sha256": "ab" * 32, "files": 10}
    for name, mu, s in (("g.npz", mu1, s1), ("r.npz", mu2, s2)):
        stats_io.save(stats_io.Stats(mu=mu, sigma=np.diag(s), feats=None, meta=meta), tmp_path / name)
    result = audio.evaluate(tmp_path / "g.npz", tmp_path / "r.npz", None, progress=False)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert result["fad"] == pytest.approx(expected, rel=1e-9)
    assert result["kid_mean"] is None  # statistics without features give no KID
    other = {**meta, "weights_sha256": "cd" * 32}
    stats_io.save(stats_io.Stats(mu=mu1, sigma=np.diag(s1), feats=None, meta=other), tmp_path / "o.npz")
    with pytest.raises(audio.DitkError, match="different A-JEPA weights"):
        audio.evaluate(tmp_path / "o.npz", tmp_path / "r.npz", None, progress=False)


def test_clips_are_cut_into_training_windows(audio_sets):
    from ditk.audio.mel import LOG_FLOOR, normalize

    feats = audio.AJEPAFeatures(audio_sets["run"])
    front, hop = feats.front, feats.front.hop_length
    wave = _music(3, 1).waveform(0)
    long = np.concatenate([wave, wave, wave[: len(wave) // 2]])  # 2.5 windows
    w = feats.windows(long)
    spec = front(long)
    assert w.shape == (2, 1, 32, 16)
    torch.testing.assert_close(w[1, 0], spec[:, 16:32])
    short = feats.windows(wave[: 8 * hop])  # 9 frames: padded with silence to one window
    assert short.shape == (1, 1, 32, 16)
    torch.testing.assert_close(short[0, 0, :, :9], front(wave[: 8 * hop]))
    assert torch.all(short[0, 0, :, 9:] == normalize(torch.tensor(LOG_FLOOR)))
    # the embedding of a window is the target encoder's mean token
    with torch.no_grad():
        torch.testing.assert_close(feats.model.features(w), feats.model.target_encoder(w).mean(1))


def test_bad_inputs_exit_2_with_one_line(audio_sets, tmp_path):
    from ditk.config import resolve, to_yaml

    s = audio_sets
    # a run of another model: config and a checkpoint folder are all that is read before refusing it
    from ditk.runs import RunDir, save_checkpoint

    dit = tmp_path / "dit-run"
    dit.mkdir()
    (dit / "config.yaml").write_text(to_yaml(resolve("digits-dit")))
    save_checkpoint(RunDir(dit), 1, {}, {}, {"step": 1})  # a complete (empty) checkpoint: its manifest verifies
    (tmp_path / "empty").mkdir()
    cases = [
        ([s["real"], s["ref"]], "needs --features"),
        ([s["real"], s["ref"], "--features", s["ref"]], "neither a ditk run directory"),
        ([s["real"], s["ref"], "--features", dit], "is a 'dit' run"),
        ([s["real"], s["ref"], "--features", s["run"], "--run", s["run"]], "--run"),
        ([s["real"], s["ref"], "--features", s["run"], "--extractor", "digits"], "--extractor"),
        ([tmp_path / "empty", s["ref"], "--features", s["run"]], "holds no audio files"),
        ([s["real"], "--features", s["run"]], "--save-stats"),
    ]
    for args, message in cases:
        proc = invoke_ditk("evaluate-fid", "--modality", "audio", *map(str, args), "--no-progress")
        assert proc.returncode == 2 and message in proc.stderr, (args, proc.stderr[-500:])
        assert len(proc.stderr.strip().splitlines()) == 1
    proc = invoke_ditk("evaluate-fid", str(s["real"]), str(s["ref"]), "--features", str(s["run"]))
    assert proc.returncode == 2 and "--modality audio" in proc.stderr
