"""Feature caching (ditk.cache) and the time-shift sampler.

Oracles: the uncached sampler (bit-identical when nothing is skipped), closed forms (FORA's ceil(S/N) full
passes, TaylorSeer on polynomial outputs, a fully cached stack = first output + cached residual), per-row
independence, and a float64 reference trajectory of TS-DDIM on data whose exact denoiser is known.
"""

import json
import math

import numpy as np
import pytest
import torch
import torch.nn as nn

from ditk.cache import build_policy
from ditk.cache.adapters import register_block
from ditk.errors import ConfigError
from ditk.models.dit import DiT
from ditk.objectives.ddpm import DDPM, DDPMConfig
from ditk.objectives.flow import FlowConfig, RectifiedFlow
from ditk.registry import CACHE_POLICIES
from ditk.sampling import sample

NO_SKIP = {"fora": {"interval": 1}, "taylorseer": {"interval": 1}, "delta-dit": {"interval": 1},
           "fbc": {"threshold": 0.0}, "teacache": {"threshold": 0.0}}


def random_dit(learn_sigma=True, depth=4):
    """A tiny DiT with every weight random: adaLN-Zero's init would make each block the identity."""
    torch.manual_seed(0)
    m = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=depth, num_heads=2, num_classes=10,
            learn_sigma=learn_sigma).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def run(model, objective, policy, solver="ddpm", steps=8, n=3, cfg_scale=3.0, seed=0):
    noise = torch.randn(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
    gens = [torch.Generator().manual_seed(100 + i) for i in range(n)]
    y, null = torch.arange(n) % 10, torch.full((n,), 10)
    return sample(model, objective, noise, {"y": y}, {"y": null}, solver=solver, steps=steps, cfg_scale=cfg_scale,
                  generator=gens, cache=policy)


def test_registered_policies():
    assert set(CACHE_POLICIES.names()) == {"fora", "taylorseer", "delta-dit", "fbc", "teacache"}


@pytest.mark.parametrize("name", sorted(NO_SKIP))
@pytest.mark.parametrize("family", ["ddpm", "flow"])
def test_nothing_skipped_is_bit_identical(name, family):
    if family == "ddpm":  # ancestral DDPM with learned variance and CFG on the doubled batch
        model, objective, solver = random_dit(), DDPM(DDPMConfig()), "ddpm"
    else:  # Heun: two model evaluations per step
        model, objective, solver = random_dit(learn_sigma=False), RectifiedFlow(FlowConfig()), "heun"
    reference = run(model, objective, None, solver)
    policy = build_policy(name, NO_SKIP[name])
    out = run(model, objective, policy, solver)
    assert torch.equal(out, reference)
    report = policy.report()
    assert report["full_evaluations"] == report["model_evaluations"] > 0
    assert all(u["cached"] == 0 for u in report["units"].values())
    assert "forward" not in model.blocks[0].__dict__ and "forward" not in model.blocks[0].attn.__dict__  # restored


@pytest.mark.parametrize("steps,interval", [(10, 3), (10, 4), (7, 2), (9, 3), (5, 1)])
def test_fora_computes_ceil_steps_over_n_full_passes(steps, interval):
    model = random_dit()
    policy = build_policy("fora", {"interval": interval})
    out = run(model, DDPM(DDPMConfig()), policy, "ddim", steps=steps)
    report = policy.report()
    full = math.ceil(steps / interval)
    assert report["model_evaluations"] == steps
    assert report["full_evaluations"] == full
    assert report["units"]["blocks.0.attn"] == {"computed": full, "cached": steps - full}
    assert set(report["units"]) == {f"blocks.{i}.{m}" for i in range(4) for m in ("attn", "mlp")}
    if interval > 1:  # it does cache: the samples move away from the uncached ones
        assert not torch.equal(out, run(model, DDPM(DDPMConfig()), None, "ddim", steps=steps))


# ---------------------------------------------------------------------------------------------------------------
# TaylorSeer on outputs that are polynomials in the step index


class Poly(nn.Module):
    """Output sum_k coeffs[k] * s^k for the evaluation index s carried by the block input."""

    def __init__(self, coeffs):
        super().__init__()
        self.coeffs = coeffs

    def forward(self, s):
        return sum(c * s**k for k, c in enumerate(self.coeffs))


class PolyBlock(nn.Module):
    def __init__(self, attn, mlp):
        super().__init__()
        self.attn, self.mlp = attn, mlp

    def forward(self, x, s):
        return x + self.attn(s) + self.mlp(s)


register_block(PolyBlock, sub_modules=("attn", "mlp"))


class PolyModel(nn.Module):
    def __init__(self, degree, depth=2):
        super().__init__()
        g = torch.Generator().manual_seed(degree)
        coeffs = lambda: [torch.randn(1, 3, 5, generator=g, dtype=torch.float64) for _ in range(degree + 1)]  # noqa: E731
        self.blocks = nn.ModuleList([PolyBlock(Poly(coeffs()), Poly(coeffs())) for _ in range(depth)])

    def forward(self, x, t):
        s = t.to(torch.float64).view(-1, 1, 1)
        for block in self.blocks:
            x = block(x, s)
        return x


def evaluate(model, policy, steps=17):
    x = torch.zeros(2, 3, 5, dtype=torch.float64)
    outs = []
    with policy.session(model, steps):
        for i in range(steps):
            outs.append(model(x, torch.full((2,), float(i))))
    exact = [model(x, torch.full((2,), float(i))) for i in range(steps)]
    return outs, exact


@pytest.mark.parametrize("estimator", ["taylorseer", "newton"])
def test_taylorseer_order_one_is_exact_on_linear_outputs(estimator):
    policy = build_policy("taylorseer", {"interval": 4, "max_order": 1, "estimator": estimator})
    outs, exact = evaluate(PolyModel(degree=1), policy)
    for out, ref in zip(outs, exact):
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
    assert policy.report()["full_evaluations"] == 5  # 0, 1 (first_enhance 2), then one in 4: 5, 9, 13


def test_taylorseer_order_two_is_exact_on_quadratic_outputs():
    policy = build_policy("taylorseer", {"interval": 4, "max_order": 2, "estimator": "newton"})
    outs, exact = evaluate(PolyModel(degree=2), policy)
    # Full at 0, 1, 5, 9, 13: from evaluation 5 on, three nodes determine the quadratic.
    for out, ref in zip(outs[5:], exact[5:]):
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    assert (outs[3] - exact[3]).abs().max() > 1e-3  # with two nodes (0, 1) it is only linear
    order1 = build_policy("taylorseer", {"interval": 4, "max_order": 1, "estimator": "newton"})
    outs1, _ = evaluate(PolyModel(degree=2), order1)
    assert (outs1[7] - exact[7]).abs().max() > 1e-3  # order 1 cannot follow the curvature


def test_taylorseer_paper_estimator_on_a_quadratic_has_the_closed_form_bias():
    """The paper's differences are derivatives at the newest point only up to O(gap): for f = a s^2 sampled
    every h steps, D1 = a(2 s0 - h), D2 = 2a, so the order-2 forecast is f(s0 + d) - a h d."""
    model = PolyModel(degree=2, depth=1)
    a = model.blocks[0].attn.coeffs[2] + model.blocks[0].mlp.coeffs[2]
    policy = build_policy("taylorseer", {"interval": 4, "max_order": 2})
    outs, exact = evaluate(model, policy)
    # Full evaluations 0, 1, 5, 9, 13: from 13 on the last three nodes are evenly spaced (h = 4).
    for s in (14, 15, 16):
        torch.testing.assert_close(outs[s], exact[s] - a * 4 * (s - 13), rtol=1e-10, atol=1e-10)


# ---------------------------------------------------------------------------------------------------------------
# Block-level policies


def test_delta_dit_caches_rear_blocks_early_and_front_blocks_late():
    model = random_dit(depth=4)
    policy = build_policy("delta-dit", {"interval": 2, "blocks": 3, "switch": 4})
    run(model, DDPM(DDPMConfig()), policy, "ddim", steps=10)
    units = policy.report()["units"]
    # Evaluations 1, 3 (< switch) skip the rear blocks 1..3; 5, 7, 9 skip the front blocks 0..2.
    assert [units[f"blocks.{j}"]["cached"] for j in range(4)] == [3, 5, 5, 2]
    assert policy.report()["full_evaluations"] == 5


def test_fully_cached_stacks_reuse_the_first_residual():
    """With an infinite threshold, every evaluation after the first (TeaCache: but the last) adds the
    residual cached at evaluation 0 to the current stack input (TeaCache) / block-0 output (FBC)."""
    model = random_dit(depth=3)
    x = torch.randn(2, 16, 32, generator=torch.Generator().manual_seed(3))
    c0, c1 = torch.randn(2, 32, generator=torch.Generator().manual_seed(4)), torch.randn(2, 32)
    x1 = x + 0.1

    def stack(h, c):
        for block in model.blocks:
            h = block(h, c)
        return h

    class Stack(nn.Module):  # a "model" whose input is the token sequence itself
        def __init__(self):
            super().__init__()
            self.blocks = model.blocks

        def forward(self, h, c):
            return stack(h, c)

    m = Stack()
    for name, expected in [("teacache", lambda: x1 + (stack(x, c0) - x)),
                           ("fbc", lambda: model.blocks[0](x1, c1) + (stack(x, c0) - model.blocks[0](x, c0)))]:
        policy = build_policy(name, {"threshold": 1e9})
        with torch.no_grad(), policy.session(m, 3):
            first = m(x, c0)
            second = m(x1, c1)
            m(x1, c1)
        with torch.no_grad():
            torch.testing.assert_close(first, stack(x, c0))
            torch.testing.assert_close(second, expected(), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name,options", [("fbc", {"threshold": 0.75}), ("teacache", {"threshold": 0.3})])
def test_dynamic_policies_decide_per_row(name, options):
    """Each image (and CFG branch) has its own decision and cache: image 0 sampled alone or next to others
    is the same, although the rows of a batch cache at different evaluations."""
    model = random_dit()
    obj = DDPM(DDPMConfig())
    together = build_policy(name, options)
    a = run(model, obj, together, "ddim", steps=12, n=4)
    alone = run(model, obj, build_policy(name, options), "ddim", steps=12, n=1)
    torch.testing.assert_close(a[:1], alone, rtol=1e-5, atol=1e-5)
    cached = together.report()["units"]["blocks.3"]["cached"]
    assert 0 < cached < 12  # it skipped something, but not everything
    assert cached != round(cached)  # ... and not on the same evaluations for every row


# ---------------------------------------------------------------------------------------------------------------
# Errors


def test_bad_policies_and_options_fail_loudly():
    with pytest.raises(ConfigError, match="fora"):
        build_policy("froa")
    with pytest.raises(ConfigError, match="interval"):
        build_policy("fora", {"intervall": 2})
    with pytest.raises(ConfigError):
        build_policy("fora", {"interval": "often"})
    with pytest.raises(ConfigError, match="estimator"):
        build_policy("taylorseer", {"estimator": "magic"})
    with pytest.raises(ConfigError, match="--cache"):
        build_policy("none", {"interval": 2})

    class NoBlocks(nn.Module):
        def forward(self, x, t):
            return x

    class OpaqueBlock(nn.Module):
        def forward(self, x, c):
            return x

    class Opaque(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([OpaqueBlock(), OpaqueBlock()])

        def forward(self, x, t):
            return x

    for name in NO_SKIP:
        with pytest.raises(ConfigError, match="hooked nothing"):
            with build_policy(name).session(NoBlocks(), 4):
                pass
    for name in ("fora", "taylorseer"):  # no attention / MLP sub-modules to cache
        with pytest.raises(ConfigError, match="hooked nothing"):
            with build_policy(name).session(Opaque(), 4):
                pass
    with pytest.raises(ConfigError, match="modulated input"):  # no adapter for OpaqueBlock
        with build_policy("teacache").session(Opaque(), 4):
            pass
    with pytest.raises(ConfigError, match="2 blocks"):
        with build_policy("fbc").session(random_dit(depth=1), 4):
            pass
    with pytest.raises(ConfigError, match="depth"):
        with build_policy("delta-dit", {"blocks": 9}).session(random_dit(depth=4), 4):
            pass


def test_bf16_sampling_autocasts_the_model_on_cpu():
    """precision="bf16" runs every denoiser call under CPU autocast (bf16 linear layers), the solver in fp32; the
    result matches fp32 sampling to bf16 accuracy. fp32 (the default) sees no autocast."""
    model, noise = random_dit(), torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    seen = {"fp32": set(), "bf16": set()}
    out = {}
    for precision in ("fp32", "bf16"):
        hook = model.blocks[0].attn.qkv.register_forward_hook(
            lambda m, a, y, p=precision: seen[p].add((y.dtype, torch.is_autocast_enabled("cpu"))))
        out[precision] = sample(model, DDPM(DDPMConfig()), noise, {"y": torch.tensor([1, 2])}, solver="ddim",
                                steps=4, precision=precision)
        hook.remove()
    assert seen == {"fp32": {(torch.float32, False)}, "bf16": {(torch.bfloat16, True)}}
    assert out["bf16"].dtype == torch.float32 and not torch.equal(out["bf16"], out["fp32"])
    err = (out["bf16"] - out["fp32"]).norm() / out["fp32"].norm()
    assert err < 2e-2
    # the loop keeps autocast's bf16 weight casts from step to step, except under a hook that differentiates
    # through the model (casts made afresh at every call): the same numbers either way
    class NeedsGrad:
        needs_grad = True

    fresh = sample(model, DDPM(DDPMConfig()), noise, {"y": torch.tensor([1, 2])}, solver="ddim", steps=4,
                   precision="bf16", step_hooks=[NeedsGrad()])
    assert torch.equal(fresh, out["bf16"])
    with pytest.raises(ConfigError, match="precision"):
        sample(model, DDPM(DDPMConfig()), noise, {"y": torch.tensor([1, 2])}, solver="ddim", steps=2, precision="fp8")


# ---------------------------------------------------------------------------------------------------------------
# The time-shift sampler


class ZeroDataEps(nn.Module):
    """Exact epsilon for data that are all zeros: x_t = sqrt(1 - a_t) eps. Records what it is evaluated at."""

    def __init__(self, alphas_cumprod):
        super().__init__()
        self.ac, self.calls = alphas_cumprod, []

    def forward(self, x, t, y=None):
        self.calls.append((t.clone(), x.clone()))
        a = self.ac[t.round().long()].to(x.dtype).view(-1, 1, 1, 1)
        return x / (1 - a).sqrt()


def row_noise(variances):
    """Rows of 16x16 noise with exactly the given (unbiased) pixel variances."""
    z = torch.randn(len(variances), 1, 16, 16, generator=torch.Generator().manual_seed(7), dtype=torch.float64)
    z = (z - z.mean(dim=(1, 2, 3), keepdim=True)) / z.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    return (z * torch.tensor(variances, dtype=torch.float64).sqrt().view(-1, 1, 1, 1)).float()


def test_time_shift_window_zero_is_ddim():
    obj = DDPM(DDPMConfig())
    noise = row_noise([1.0, 1.2])
    plain = sample(ZeroDataEps(obj.alphas_cumprod), obj, noise, {}, solver="ddim", steps=10)
    shifted = sample(ZeroDataEps(obj.alphas_cumprod), obj, noise, {}, solver="ddim", steps=10, time_shift_window=0)
    assert torch.equal(plain, shifted)


def test_time_shift_follows_the_float64_reference():
    """x0 = 0 data keep every row a scaled copy of its noise, x = c_k z, so each step's choice
    argmin_t' (c_k^2 var(z) - (1 - abar_t'))^2 and the DDIM update c <- c sqrt((1 - abar_prev) / (1 - abar_t'))
    can be followed exactly; rows noisier (1.3) or cleaner (0.8) than nominal shift up / down the window."""
    obj = DDPM(DDPMConfig())
    variances, steps, window, cutoff = [1.0, 1.3, 0.8], 10, 40, 300
    model = ZeroDataEps(obj.alphas_cumprod)
    sample(model, obj, row_noise(variances), {}, solver="ddim", steps=steps, time_shift_window=window,
           time_shift_cutoff=cutoff)
    ac = obj.alphas_cumprod.double().numpy()
    stride = 1000 // steps
    nominal = [stride * k for k in reversed(range(steps))]
    for r, v in enumerate(variances):
        c = 1.0
        for k, tau in enumerate(nominal):
            if k == 0 or tau <= cutoff:
                ts = tau
            else:
                lo = max(tau - window // 2, 0)
                cand = 1 - ac[lo: tau + window // 2 + 1]
                ts = lo + int(np.argmin((c * c * v - cand) ** 2))
            t_seen, x_seen = model.calls[k]
            assert int(t_seen[r]) == ts, (r, k)
            assert x_seen[r].double().var().item() == pytest.approx(c * c * v, rel=1e-4)
            a_prev = ac[ts - stride] if ts - stride >= 0 else 1.0
            c *= math.sqrt((1 - a_prev) / (1 - ac[ts]))
    shifts = [[int(t[r]) - tau for (t, _), tau in zip(model.calls, nominal)] for r in range(3)]
    assert max(shifts[1]) > 0 and min(shifts[2]) < 0  # the noisy row moved up, the clean row down


def test_time_shift_errors():
    obj = DDPM(DDPMConfig())
    with pytest.raises(ConfigError, match="ddim"):
        sample(ZeroDataEps(obj.alphas_cumprod), obj, torch.randn(1, 1, 4, 4), {}, solver="unipc", steps=3,
               time_shift_window=10)
    flow = RectifiedFlow(FlowConfig())
    with pytest.raises(ConfigError):
        sample(ZeroDataEps(obj.alphas_cumprod), flow, torch.randn(1, 1, 4, 4), {}, solver="euler", steps=3,
               time_shift_window=10)


# ---------------------------------------------------------------------------------------------------------------
# The CLI (in-process: the same entry point as the `ditk` script, without a fresh interpreter per call)


def ditk(capsys, *args):
    from ditk.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main([str(a) for a in args])
    captured = capsys.readouterr()
    return exit_info.value.code, captured.out, captured.err


def _report(out):
    return json.loads((out / "report.json").read_text())


def test_cli_cache_report_compare_and_compile(trained_run, tmp_path, capsys, monkeypatch):
    args = ["--num", "3", "--batch-size", "3", "--steps", "7", "--cfg-scale", "2", "--no-progress"]
    out = tmp_path / "fora"
    code, stdout, stderr = ditk(capsys, "sample", trained_run, *args, "--cache", "fora", "--cache-opt", "interval=3",
                                "--compare-to-full", "--out", out)
    assert code == 0 and stdout.strip() == str(out) and "faster than full compute" in stderr
    report = _report(out)
    assert report["cache"]["policy"] == "fora" and report["cache"]["options"] == {"interval": 3}
    assert report["cache"]["full_evaluations"] == 3 and report["cache"]["model_evaluations"] == 7  # ceil(7/3)
    assert report["cache"]["trajectories"] == 6  # 3 images x (cond, uncond)
    assert report["cache"]["units"]["blocks.1.mlp"] == {"computed": 3, "cached": 4}
    assert report["settings"]["cache"] == "fora" and report["seconds_per_image"] > 0
    comparison = report["comparison"]
    assert comparison["full_model_evaluations"] == 7 and comparison["speedup"] > 0
    assert comparison["fid_vs_full"]["feature_extractor"] == "digits" and comparison["fid_vs_full"]["n"] == 3
    full = np.load(out / "full" / "samples.npz")["arr_0"]
    cached = np.load(out / "samples.npz")["arr_0"]
    mse = np.mean((full.astype(float) - cached.astype(float)) ** 2)
    assert comparison["psnr_db"] == (None if mse == 0 else pytest.approx(10 * np.log10(255**2 / mse), abs=1e-3))
    # No cache gives the comparison's full-compute images, and so does --compile (dynamo, eager backend).
    monkeypatch.setenv("DITK_COMPILE_BACKEND", "eager")
    plain = tmp_path / "plain"
    assert ditk(capsys, "sample", trained_run, *args, "--compile", "--out", plain)[0] == 0
    np.testing.assert_array_equal(np.load(plain / "samples.npz")["arr_0"], full)
    assert _report(plain)["compile"] == {"requested": True, "backend": "eager", "cuda_graphs": False, "active": True,
                                         "note": None}
    assert _report(plain)["cache"]["full_evaluations"] == 7
    # CUDA graphs need the model on CUDA and the compiled units: one line each, exit 2, nothing written.
    for extra, words in (([], "--device cuda"), (["--compile"], "--device cuda")):
        code, _, stderr = ditk(capsys, "sample", trained_run, *args, *extra, "sample.cuda_graphs=true",
                               "--out", tmp_path / "graphs")
        assert code == 2 and words in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "graphs").exists()
    code, _, stderr = ditk(capsys, "sample", trained_run, *args, "--cache", "fora", "--cache-opt", "intervall=3",
                           "--out", tmp_path / "x")
    assert code == 2 and "did you mean 'interval'" in stderr


def test_cli_teacache_calibration_is_stored_and_reused(trained_run, tmp_path, capsys):
    import shutil

    run_dir = tmp_path / "run"
    shutil.copytree(trained_run, run_dir)
    args = ["--num", "2", "--batch-size", "2", "--steps", "8", "--cfg-scale", "1", "--no-progress", "--cache", "teacache"]
    assert ditk(capsys, "sample", run_dir, *args, "--calibrate", "--out", tmp_path / "a")[0] == 0
    stored = json.loads((run_dir / "teacache.json").read_text())
    assert len(stored["coefficients"]) == 5 and stored["points"] == 2 * 7  # 2 rows x 7 consecutive pairs
    assert ditk(capsys, "sample", run_dir, *args, "--out", tmp_path / "b")[0] == 0
    for name in ("a", "b"):
        assert _report(tmp_path / name)["cache"]["options"]["coefficients"] == stored["coefficients"]
    np.testing.assert_array_equal(np.load(tmp_path / "a" / "samples.npz")["arr_0"],
                                  np.load(tmp_path / "b" / "samples.npz")["arr_0"])
    code, _, stderr = ditk(capsys, "sample", run_dir, "--num", "1", "--cache", "fora", "--calibrate", "--out", tmp_path / "c")
    assert code == 2 and "teacache" in stderr


def test_threshold_zero_never_skips_even_an_unchanged_input():
    """FBC reused block 0's residual when it changed by <= threshold, so threshold 0 still skipped when an
    evaluation repeated the previous one exactly (e.g. a model at its adaLN-Zero init under a flow solver), and
    x + (out - x) is out only up to rounding: a "nothing skipped" run was then not bit-identical."""
    model = random_dit(depth=3)
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    t, y = torch.full((2,), 10.0), torch.tensor([1, 2])
    with torch.no_grad():
        full = model(x, t, y)
        for name in ("fbc", "teacache"):
            policy = build_policy(name, {"threshold": 0.0})
            with policy.session(model, 3):
                outs = [model(x, t, y) for _ in range(3)]
            assert all(torch.equal(out, full) for out in outs)
            assert policy.report()["full_evaluations"] == 3


def test_policies_are_abstract():
    from ditk.cache.base import CachePolicy

    with pytest.raises(TypeError, match="abstract"):
        CachePolicy()


def test_cuda_graph_units_compile_in_reduce_overhead_mode_and_return_copies(monkeypatch):
    """sample.cuda_graphs: each unit is compiled with mode="reduce-overhead" (inductor's CUDA graphs), a new
    graph step is marked before each call, and the caller gets a copy of the outputs: a replay overwrites the
    graph's output buffers, while caches and multistep solvers keep earlier outputs. (The capture itself needs
    a GPU; this checks what ditk asks of torch.)"""
    from ditk.cache import pipeline

    calls, buffer = [], torch.zeros(3)

    def fake_compile(fn, backend=None, mode=None):
        calls.append(mode)

        def replay(x):  # what a CUDA graph replay does: the same output storage every call
            buffer.copy_(fn(x))
            return buffer, {"aux": buffer}
        return replay

    steps = []
    monkeypatch.setattr(torch, "compile", fake_compile)
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: steps.append(1))
    unit = pipeline._Compiled(lambda x: x * 2, "inductor", cuda_graphs=True)
    first, aux = unit(torch.ones(3))
    second, _ = unit(torch.full((3,), 5.0))
    assert calls == ["reduce-overhead"] and len(steps) == 2
    assert first.tolist() == [2.0] * 3 and aux["aux"].tolist() == [2.0] * 3 and second.tolist() == [10.0] * 3
    assert pipeline._Compiled(lambda x: x, "inductor").cuda_graphs is False and calls[-1] is None
