"""Simulated PTQ: each fake quantizer against a closed form, and the methods end to end on a tiny run."""

import json
import subprocess
import sys

import pytest
import torch

from ditk.quantize.gptq import gptq
from ditk.quantize.methods.ptq4dit import spearman, ssc_salience
from ditk.quantize.methods.svdquant import low_rank_split
from ditk.quantize.quantizers import minmax_params, quantize_activation, quantize_weight
from ditk.quantize.smoothing import balance, balance_factors
from ditk_testing import invoke_ditk


@pytest.mark.parametrize("bits", [2, 4, 8])
@pytest.mark.parametrize("symmetric", [False, True])
def test_uniform_quantizer_error_is_at_most_half_a_step(bits, symmetric):
    g = torch.Generator().manual_seed(bits)
    w = torch.randn(16, 64, generator=g, dtype=torch.float64) * torch.rand(16, 1, generator=g, dtype=torch.float64) * 5
    for group in (None, 16):
        q = quantize_weight(w, bits, group, symmetric)
        rows = w.reshape(16, -1, group or 64)
        scale = minmax_params(rows, bits, symmetric)[0]
        err = (q - w).abs().reshape(rows.shape)
        assert (err <= scale / 2 + 1e-12).all()
        levels = 2**bits - (1 if symmetric else 0)
        assert all(len(torch.unique(r)) <= levels for r in q.reshape(rows.shape).reshape(-1, group or 64))
    x = torch.randn(3, 5, 64, generator=g, dtype=torch.float64)
    for gran in ("token", "token-group", "sample-group"):
        xq = quantize_activation(x, bits, gran, 16, symmetric)
        assert xq.shape == x.shape and (xq - x).abs().max() <= x.abs().max() / (2 ** (bits - 1) - 1)


def test_csb_leaves_the_layer_output_unchanged_in_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(50, 32, generator=g, dtype=torch.float64) * torch.logspace(-2, 2, 32, dtype=torch.float64)
    w = torch.randn(24, 32, generator=g, dtype=torch.float64)
    b = balance_factors(x.abs().amax(0), w)
    assert not torch.allclose(b, torch.ones_like(b))
    torch.testing.assert_close((x / b) @ balance(w, b).T, x @ w.T, rtol=1e-12, atol=1e-12)
    # balanced salience: max|X'_j| = max|W'_j| = sqrt(s(X_j) s(W_j)) (PTQ4DiT eq. 6)
    torch.testing.assert_close((x / b).abs().amax(0), balance(w, b).abs().amax(0), rtol=1e-12, atol=1e-12)


def test_ssc_weights_timesteps_by_softmax_of_minus_spearman_rho():
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    per_t = {0: torch.tensor([1.0, 2.0, 3.0, 4.0]), 1: torch.tensor([4.0, 3.0, 2.0, 1.0])}  # rho = +1, -1
    assert spearman(per_t[0], w[0]) == pytest.approx(1) and spearman(per_t[1], w[0]) == pytest.approx(-1)
    s, info = ssc_salience(per_t, w)
    e = torch.softmax(torch.tensor([-1.0, 1.0]), 0)
    torch.testing.assert_close(s, e[0] * per_t[0] + e[1] * per_t[1])
    assert info[1][1] > info[0][1]  # the anti-correlated timestep weighs more


def test_viditq_salience_is_the_momentum_average_over_the_trajectory():
    from ditk.quantize.methods.viditq import momentum_salience

    # timestep -> (sum over samples of the per-sample max |X_j|, samples)
    summax = {999: (torch.tensor([4.0, 2.0]), 2), 500: (torch.tensor([2.0, 6.0]), 1), 0: (torch.tensor([0.0, 3.0]), 3)}
    a = torch.tensor([2.0, 1.0])  # t = 999 first: the mean over its 2 samples
    a = 0.95 * a + 0.05 * torch.tensor([2.0, 6.0])
    a = 0.95 * a + 0.05 * torch.tensor([0.0, 1.0])
    torch.testing.assert_close(momentum_salience(summax, 0.95), a)


def test_svdquant_with_full_rank_reproduces_the_weight_exactly():
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 32, generator=g, dtype=torch.float64)
    l1, l2, r = low_rank_split(w, 24)
    q = quantize_weight(r, 4, 16, symmetric=True)
    torch.testing.assert_close(l1 @ l2 + q, w, rtol=0, atol=1e-12)
    l1, l2, r = low_rank_split(w, 4)  # a lower rank leaves the residual orthogonal to the kept directions
    s = torch.linalg.svdvals(w)
    assert float(r.norm() ** 2) == pytest.approx(float((s[4:] ** 2).sum()))


def test_gptq_beats_round_to_nearest_on_a_random_layer():
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(64, 64, generator=g)
    x = torch.randn(2048, 64, generator=g) @ mix  # correlated inputs: where GPTQ's error feedback matters
    w = torch.randn(32, 64, generator=g)
    for bits, group in ((4, None), (3, 16)):
        rtn = quantize_weight(w, bits, group)
        q = gptq(w, x.T @ x, bits, group)
        err_rtn = float(((x @ (rtn - w).T) ** 2).sum())
        err_gptq = float(((x @ (q - w).T) ** 2).sum())
        assert err_gptq < 0.7 * err_rtn, (bits, err_gptq, err_rtn)
        # every column group of Q stays on its own uniform grid
        for row in q.reshape(32, -1, group or 64).reshape(-1, group or 64):
            assert len(torch.unique(row)) <= 2**bits


@pytest.fixture(scope="module")
def calib_env(tmp_path_factory):
    """One calibration cache for the four methods (the set is drawn once, then reused)."""
    return {"DITK_CACHE_DIR": str(tmp_path_factory.mktemp("cache"))}


@pytest.mark.parametrize("method", ["rtn", "ptq4dit", "svdquant", "qdit", "viditq", "vq4dit", "lrqdit"])
def test_methods_write_a_simulated_folder_that_loads_identically_in_a_fresh_process(trained_run, tmp_path, method,
                                                                                    monkeypatch, calib_env):
    from ditk.quantize.api import quantize
    from ditk.quantize.checks import CalibSettings

    monkeypatch.setenv("DITK_CACHE_DIR", calib_env["DITK_CACHE_DIR"])
    options = {"population": 4, "iterations": 1} if method == "qdit" else {"rank": 4} if method == "svdquant" else {"steps": 5, "block_steps": 5} if method == "vq4dit" else {"recon_steps": 5} if method == "ptq4dit" else {}
    folder, manifest, model = quantize(str(trained_run), method=method, options=options, out=str(tmp_path / "q"),
                                       calib=CalibSettings(num=4, timesteps=2), progress=False)
    assert manifest["kind"] == "simulated" and "simulated" in manifest["note"]
    assert manifest["calibration"]["num"] == 4 and len(manifest["layers"]) == 8
    g = torch.Generator().manual_seed(0)
    x, t, y = torch.randn(2, 1, 8, 8, generator=g), torch.tensor([5, 900]), torch.tensor([2, 10])
    with torch.no_grad():
        expected = model(x, t, y)
    code = (f"import torch; from ditk.generate import load_pipeline; g = torch.Generator().manual_seed(0); "
            f"x, t, y = torch.randn(2, 1, 8, 8, generator=g), torch.tensor([5, 900]), torch.tensor([2, 10]); "
            f"m = load_pipeline({str(folder)!r}, device='cpu').model; "
            f"torch.save(m(x, t, y).detach(), {str(tmp_path / 'out.pt')!r})")
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
    assert torch.equal(torch.load(tmp_path / "out.pt", weights_only=True), expected)


def test_calibration_set_is_cached_and_reused(trained_run, tmp_path, monkeypatch):
    monkeypatch.setenv("DITK_CACHE_DIR", str(tmp_path / "cache"))
    args = ["quantize", trained_run, "--simulate", "rtn", "--calib-num", "2", "--calib-timesteps", "2", "--no-progress"]
    first = invoke_ditk(*args, "--out", tmp_path / "a", check=True)
    second = invoke_ditk(*args, "--wbits", "4", "--out", tmp_path / "b", check=True)
    assert "reusing" not in first.stderr and "reusing" in second.stderr
    a = json.loads((tmp_path / "a" / "quantization.json").read_text())["calibration"]
    b = json.loads((tmp_path / "b" / "quantization.json").read_text())["calibration"]
    assert a["cache"] == b["cache"] and b["reused"]
    (settings,) = (tmp_path / "cache" / "quant-calib").glob("*/settings.json")
    assert json.loads(settings.read_text())["settings"]["num"] == 2
    proc = invoke_ditk("sample", tmp_path / "b", "--num", "1", "--out", tmp_path / "s", "--no-progress", check=True)
    assert "simulated" in proc.stderr
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert report["model"]["quantization"]["kind"] == "simulated"
