"""`ditk evaluate-fid` as a user runs it: one JSON object on stdout, exit 2 and one line for bad input,
offline weights, statistics reuse, and `--run` on a tiny trained digits run."""

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from ditk_testing import run_ditk


def digits_uint8():
    from sklearn.datasets import load_digits

    bunch = load_digits()
    return np.clip(127.5 * (bunch.images / 8.0 - 1.0) + 128.0, 0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    """Two disjoint halves of the digits as a PNG folder and an .npz batch of the same images."""
    root = tmp_path_factory.mktemp("fid-cli")
    x = digits_uint8()[np.random.RandomState(0).permutation(1797)]
    (root / "gen").mkdir()
    for i, im in enumerate(x[:300]):
        Image.fromarray(im).save(root / "gen" / f"{i:05d}.png")
    np.savez(root / "gen.npz", arr_0=x[:300, ..., None])
    np.savez(root / "ref.npz", arr_0=x[300:700, ..., None])
    return root


def _json(proc):
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert len(proc.stdout.strip().splitlines()) == 1, proc.stdout  # stdout carries the result only
    return json.loads(proc.stdout)


def test_help_is_fast_and_says_what_is_not_done():
    proc = run_ditk("evaluate-fid", "--help")
    assert proc.returncode == 0
    text = " ".join(proc.stdout.split())
    for words in ("Not implemented yet: sFID, Inception Score, precision/recall", "legacy_tensorflow",
                  "--weights-dir", "--save-stats", "--run"):
        assert words in text
    check = "import sys, ditk.commands.evaluate_fid; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", check]).returncode == 0


def test_json_result_out_file_and_saved_statistics(sets, tmp_path):
    cache = tmp_path / "cache"
    proc = run_ditk("evaluate-fid", sets / "gen", sets / "ref.npz", "--extractor", "digits", "--out", tmp_path / "r.json",
                    "--save-stats", tmp_path / "ref-stats.npz", "--cache-dir", cache, "--kid-subsets", "10")
    result = _json(proc)
    assert "gen features" in proc.stderr  # progress on stderr
    for key in ("fid", "kid_mean", "kid_std", "n_gen", "n_ref", "mode", "feature_extractor", "weights_sha256", "seconds"):
        assert key in result
    assert (result["n_gen"], result["n_ref"], result["mode"], result["feature_extractor"]) == (300, 400, "clean", "digits")
    assert 0 < result["fid"] < 5 and result["kid_std"] >= 0
    assert json.loads((tmp_path / "r.json").read_text()) == result
    assert list(cache.glob("ref-8x8-clean-digits-*.npz"))

    # The .npz of the same images against the saved statistics: the same number.
    again = _json(run_ditk("evaluate-fid", sets / "gen.npz", tmp_path / "ref-stats.npz", "--extractor", "digits",
                           "--no-progress", "--no-cache", "--kid-subsets", "10"))
    assert again["fid"] == pytest.approx(result["fid"], rel=1e-12)
    assert again["kid_mean"] == pytest.approx(result["kid_mean"], rel=1e-12)


def test_bad_inputs_exit_2_with_one_line(sets, tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_ditk("evaluate-fid", tmp_path / "empty", sets / "ref.npz", "--extractor", "digits")
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("error: gen folder") and "holds no images" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    for args in ([sets / "gen"], [sets / "gen", sets / "ref.npz", "--num", "10"]):  # usage errors
        proc = run_ditk("evaluate-fid", *args)
        assert proc.returncode == 2 and proc.stderr.startswith("error: ")


def test_missing_inception_weights_say_which_file_where_and_its_sha256(sets, tmp_path):
    env = {"DITK_WEIGHTS_DIR": str(tmp_path / "weights")}
    proc = run_ditk("evaluate-fid", sets / "gen", sets / "ref.npz", env=env)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    for words in ("inception-2015-12-05.pt", "https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/",
                  "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4", str(tmp_path / "weights")):
        assert words in proc.stderr


def test_run_samples_and_compares_with_the_run_data_set(trained_run, tmp_path):
    args = ["evaluate-fid", "--run", trained_run, "--num", "12", "--samples-dir", tmp_path / "s", "--no-progress",
            "--kid-subsets", "5", "--cache-dir", tmp_path / "cache"]
    first = _json(run_ditk(*args))
    assert first["feature_extractor"] == "digits"  # auto: the run was trained on digits
    assert (first["n_gen"], first["n_ref"], first["num"]) == (12, 1618, 12)  # ditk's digits train split
    assert first["samples"] == str(tmp_path / "s" / "samples.npz") and first["ref_stats_cache_hit"] is False
    assert np.load(first["samples"])["arr_0"].shape == (12, 8, 8, 1)
    second = _json(run_ditk(*args))  # the samples are reused (resumable) and the reference comes from the cache
    assert second["ref_stats_cache_hit"] is True and second["fid"] == first["fid"]
