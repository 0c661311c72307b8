"""The pure-PyTorch selective scan and Mamba mixer against float64 sequential loops and transformers' MambaMixer."""

import pytest
import torch
import torch.nn.functional as F

from ditk.errors import ConfigError
import ditk.models.mamba as mamba
from ditk.models.mamba import (MAX_CHUNK, MAX_LOG_DECAY, TILE_ELEMENTS, Mamba, chunk_length, chunked_scan,
                               kernels_available, selective_scan, stable_chunk_sums)


def loop_selective_scan(u, delta, A, B, C, D, z, delta_bias):
    """Mamba's selective scan written from the paper's recurrence (Alg. 2), float64, one token at a time.
    u, delta, z (b, d, L); A (d, n); B, C (b, n, L)."""
    u, delta, A, B, C, D, z, delta_bias = (x.double() for x in (u, delta, A, B, C, D, z, delta_bias))
    dt = F.softplus(delta + delta_bias[:, None])
    h = torch.zeros(u.shape[0], u.shape[1], A.shape[1], dtype=torch.float64)
    ys = []
    for t in range(u.shape[-1]):
        h = torch.exp(dt[:, :, t, None] * A) * h + dt[:, :, t, None] * B[:, None, :, t] * u[:, :, t, None]
        ys.append((h * C[:, None, :, t]).sum(-1) + D * u[:, :, t])
    return torch.stack(ys, dim=-1) * F.silu(z)


def loop_chunked_scan(delta, du, A, B, C):
    """float64 sequential reference of `chunked_scan`: delta, du (G, L, d); A (G, n, d); B, C (G, L, n)."""
    delta, du, A, B, C = (x.double() for x in (delta, du, A, B, C))
    h = torch.zeros(A.shape, dtype=torch.float64)
    ys = []
    for t in range(delta.shape[1]):
        h = torch.exp(delta[:, t, None, :] * A) * h + du[:, t, None, :] * B[:, t, :, None]
        ys.append((h * C[:, t, :, None]).sum(1))
    return torch.stack(ys, dim=1)


def core_inputs(groups=3, length=17, d=5, n=4, seed=0, dt_scale=1.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    delta = F.softplus(r(groups, length, d) - 1) * dt_scale
    inp = [delta, delta * r(groups, length, d), -torch.exp(r(groups, n, d) * 0.5), r(groups, length, n),
           r(groups, length, n)]
    return [x.to(dtype) for x in inp]


# Lengths and chunk lengths around the chunk boundaries (a partial last chunk, one chunk, chunk length 1).
CASES = [(1, None), (2, 1), (5, 2), (17, 4), (17, None), (18, 6), (64, 8), (65, 8), (130, 11), (130, None)]


@pytest.mark.parametrize("length,chunk", CASES)
def test_chunked_scan_equals_the_sequential_loop(length, chunk):
    inp = core_inputs(length=length, seed=length)
    torch.testing.assert_close(chunked_scan(*inp, chunk=chunk), loop_chunked_scan(*inp), rtol=1e-10, atol=1e-10)
    # float32 (what models run): close to the float64 loop
    ours32 = chunked_scan(*(x.float() for x in inp), chunk=chunk)
    torch.testing.assert_close(ours32.double(), loop_chunked_scan(*inp), rtol=1e-4, atol=1e-5)


def test_chunk_lengths_fit_the_cache_and_the_decays():
    for length, d, n in [(1026, 736, 16), (4098, 1536, 16), (18, 128, 4), (7, 64, 4)]:
        lc = chunk_length(length, d, n)
        assert 1 <= lc <= min(length, MAX_CHUNK)
        assert lc == 1 or lc * d * n <= 2 * TILE_ELEMENTS
        assert -(-length // lc) * lc - length < -(-length // lc)  # padding: less than one token per chunk
    # decays fast enough to overflow the factorised form shorten the chunks, down to the plain recurrence
    delta, du, A, B, C = core_inputs(groups=2, length=40, dt_scale=30.0, dtype=torch.float32)
    a_max = A.abs().amax(-2)
    S, lc = stable_chunk_sums(delta, a_max, 40)
    assert lc < 40 and S.shape == (2, -(-40 // lc), lc, 5)
    assert lc == 1 or (S[:, :, -1] * a_max[:, None]).max() <= MAX_LOG_DECAY[torch.float32]
    torch.testing.assert_close(S.flatten(1, 2)[:, :40, 0], torch.cat(
        [c.cumsum(1) for c in delta[..., 0].split(lc, dim=1)], 1))
    out = chunked_scan(delta, du, A, B, C)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), loop_chunked_scan(delta, du, A, B, C), rtol=1e-4, atol=1e-4)


def test_sequences_scanned_in_several_calls_give_the_same_result(monkeypatch):
    """Large batches are split into calls of GROUP_TILE_ELEMENTS; a sequence's result does not depend on it."""
    inp = core_inputs(groups=5, length=23, seed=3, dtype=torch.float32)
    whole = chunked_scan(*inp, chunk=4)
    monkeypatch.setattr(mamba, "GROUP_TILE_ELEMENTS", 1)  # one sequence per call
    assert torch.equal(chunked_scan(*inp, chunk=4), whole)
    assert torch.equal(chunked_scan(*(x[2:3] for x in inp), chunk=4), whole[2:3])


@pytest.mark.parametrize("length,chunk", [(1, None), (5, 1), (7, 3), (9, None)])
def test_chunked_scan_gradients_pass_gradcheck(length, chunk):
    inp = [x.requires_grad_() for x in core_inputs(groups=2, length=length, d=3, n=2, seed=length)]
    assert torch.autograd.gradcheck(lambda *a: chunked_scan(*a, chunk=chunk), inp)


def test_chunked_scan_gradients_equal_autograd_through_the_loop():
    inp = [x.requires_grad_() for x in core_inputs(length=37, seed=5)]
    w = torch.randn(3, 37, 5, dtype=torch.float64)
    ours = torch.autograd.grad((chunked_scan(*inp, chunk=6) * w).sum(), inp)
    ref = torch.autograd.grad((loop_chunked_scan(*inp) * w).sum(), inp)
    for name, a, b in zip(["delta", "du", "A", "B", "C"], ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


def scan_inputs(b=2, d=6, n=4, length=33, seed=0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    A = -torch.exp(r(d, n) * 0.5)
    return dict(u=r(b, d, length), delta=r(b, d, length) - 1, A=A, B=r(b, n, length), C=r(b, n, length), D=r(d),
                z=r(b, d, length), delta_bias=r(d) * 0.3)


def test_selective_scan_equals_float64_loop():
    inp = scan_inputs()
    ref = loop_selective_scan(**inp)
    ours = selective_scan(**inp, delta_softplus=True)
    assert ours.dtype == torch.float64
    torch.testing.assert_close(ours, ref, rtol=1e-10, atol=1e-10)
    # float32 inputs: float32 scan, close to the float64 loop
    ours32 = selective_scan(**{k: v.float() for k, v in inp.items()}, delta_softplus=True)
    assert ours32.dtype == torch.float32
    torch.testing.assert_close(ours32.double(), ref, rtol=1e-4, atol=1e-4)
    # bfloat16 inputs: the recurrence still runs in float32, the result comes back in bfloat16
    ours16 = selective_scan(**{k: v.bfloat16() for k, v in inp.items()}, delta_softplus=True)
    assert ours16.dtype == torch.bfloat16 and torch.isfinite(ours16).all()


def test_selective_scan_gradients_equal_autograd_through_the_loop():
    inp = {k: v.requires_grad_() for k, v in scan_inputs(length=20, seed=1).items()}
    weights = torch.randn(2, 6, 20, dtype=torch.float64)
    ours = torch.autograd.grad((selective_scan(**inp, delta_softplus=True) * weights).sum(), list(inp.values()))
    ref = torch.autograd.grad((loop_selective_scan(**inp) * weights).sum(), list(inp.values()))
    for name, a, b in zip(inp, ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


def hf_mixer(hidden=16, state=8, rank=3, conv=4, seed=0):
    from transformers import MambaConfig
    from transformers.models.mamba.modeling_mamba import MambaMixer

    config = MambaConfig(hidden_size=hidden, state_size=state, expand=2, conv_kernel=conv, time_step_rank=rank,
                         use_bias=False, use_conv_bias=True, num_hidden_layers=1)
    torch.manual_seed(seed)
    mixer = MambaMixer(config, layer_idx=0)
    with torch.no_grad():  # perturb every weight so that no term can hide behind its initial value
        for p in mixer.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    return mixer


def hf_slow_forward(mixer, x):
    """transformers' pure-PyTorch path: `slow_forward` where it exists (transformers 4.x); in 5.x the eval-mode
    forward without a cache runs the same sequential scan when no kernel is installed."""
    mixer.eval()
    return mixer.slow_forward(x) if hasattr(mixer, "slow_forward") else mixer(x)


def test_mixer_loads_transformers_weights_and_matches_its_slow_path():
    ref = hf_mixer()
    ours = Mamba(16, d_state=8, d_conv=4, expand=2, dt_rank=3, scan_backend="torch")
    ours.load_state_dict(ref.state_dict())  # strict: same names and shapes
    x = torch.randn(3, 45, 16, generator=torch.Generator().manual_seed(3), requires_grad=True)
    out_ref = hf_slow_forward(ref, x)
    out = ours(x)
    torch.testing.assert_close(out, out_ref, rtol=1e-4, atol=1e-5)
    # and the gradients (our scan's custom backward against autograd through transformers' loop)
    w = torch.randn_like(out)
    g_ref = torch.autograd.grad((out_ref * w).sum(), [x, *ref.parameters()])
    g = torch.autograd.grad((out * w).sum(), [x, *[dict(ours.named_parameters())[n] for n, _ in ref.named_parameters()]])
    for (name, _), a, b in zip([("input", None), *ref.named_parameters()], g, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=name)


def test_bidirectional_mixer_is_a_forward_and_a_reversed_scan_sharing_projections():
    """Vision Mamba v2: out = out_proj(y_fwd(x) + flip(y_bwd(flip x))), in_proj/out_proj shared. Each term is a
    transformers MambaMixer (out_proj is linear without bias, so the sum can be taken after it)."""
    fwd, bwd = hf_mixer(seed=0), hf_mixer(seed=1)
    with torch.no_grad():
        bwd.in_proj.weight.copy_(fwd.in_proj.weight)
        bwd.out_proj.weight.copy_(fwd.out_proj.weight)
    ours = Mamba(16, d_state=8, d_conv=4, expand=2, dt_rank=3, bidirectional=True)
    state = dict(fwd.state_dict())
    for name, value in bwd.state_dict().items():
        if name.split(".")[0] in ("conv1d", "x_proj", "dt_proj"):
            state[name.replace(name.split(".")[0], name.split(".")[0] + "_b", 1)] = value
    state["A_b_log"], state["D_b"] = bwd.A_log, bwd.D
    ours.load_state_dict(state)
    x = torch.randn(2, 30, 16, generator=torch.Generator().manual_seed(4), requires_grad=True)
    ref = hf_slow_forward(fwd, x) + hf_slow_forward(bwd, x.flip(1)).flip(1)
    out = ours(x)
    torch.testing.assert_close(out, ref, rtol=1e-4, atol=1e-5)
    # gradients of the input and of both directions' parameters (the reversed scan's custom backward included)
    w = torch.randn_like(out)
    names = [n for n, _ in ours.named_parameters()]
    g = dict(zip(["input", *names], torch.autograd.grad((out * w).sum(), [x, *ours.parameters()])))
    ref_params = {**{n: p for n, p in fwd.named_parameters()},
                  **{(n.replace(n.split(".")[0], n.split(".")[0] + "_b", 1) if n.split(".")[0] in
                      ("conv1d", "x_proj", "dt_proj") else {"A_log": "A_b_log", "D": "D_b"}.get(n, "skip." + n)): p
                     for n, p in bwd.named_parameters()}}
    ref_names = [n for n in ref_params if not n.startswith("skip.")]
    # in_proj / out_proj are shared: their reference gradient is the sum over the two transformers mixers
    targets = [x, *(ref_params[n] for n in ref_names), bwd.in_proj.weight, bwd.out_proj.weight]
    *grads, g_in_b, g_out_b = torch.autograd.grad((ref * w).sum(), targets)
    g_ref = dict(zip(["input", *ref_names], grads))
    g_ref["in_proj.weight"] = g_ref["in_proj.weight"] + g_in_b
    g_ref["out_proj.weight"] = g_ref["out_proj.weight"] + g_out_b
    assert set(g_ref) == set(g)
    for name in g:
        torch.testing.assert_close(g[name], g_ref[name], rtol=1e-3, atol=1e-4, msg=name)
    with torch.no_grad():
        ours.divide_out = True
        torch.testing.assert_close(ours(x), ref / 2, rtol=1e-4, atol=1e-5)


def test_mixer_init_matches_mamba_ssm():
    torch.manual_seed(0)
    m = Mamba(32, d_state=16, expand=2, bidirectional=True)
    assert m.dt_rank == 2 and m.d_inner == 64
    for A_log, D, dt_proj in ((m.A_log, m.D, m.dt_proj), (m.A_b_log, m.D_b, m.dt_proj_b)):
        torch.testing.assert_close(-torch.exp(A_log), -torch.arange(1, 17.0).expand(64, 16))
        assert torch.equal(D, torch.ones(64))
        dt = F.softplus(dt_proj.bias)
        assert dt.min() >= 1e-3 * 0.999 and dt.max() <= 0.1 * 1.001  # log-uniform in [dt_min, dt_max]
        assert dt_proj.weight.abs().max() <= 2**-0.5
    assert {n for n, _ in m.named_parameters()} == {
        "in_proj.weight", "out_proj.weight", "conv1d.weight", "conv1d.bias", "x_proj.weight", "dt_proj.weight",
        "dt_proj.bias", "A_log", "D", "conv1d_b.weight", "conv1d_b.bias", "x_proj_b.weight", "dt_proj_b.weight",
        "dt_proj_b.bias", "A_b_log", "D_b"}


def test_out_hook_sees_the_gated_scan_output():
    m = Mamba(16, d_state=4).eval()
    seen = []
    m.out_hook.register_forward_hook(lambda mod, inp, out: seen.append(out))
    x = torch.randn(2, 7, 16)
    with torch.no_grad():
        out = m(x)
    assert seen[0].shape == (2, 7, 32)
    torch.testing.assert_close(m.out_proj(seen[0]), out)


def test_kernel_path_plumbing_equals_the_batched_path():
    """The per-direction path that feeds mamba_ssm's kernel (layouts (N, d, L), flips, D and z inside the call),
    run here with the PyTorch scan behind `selective_scan`, equals the batched PyTorch forward."""
    torch.manual_seed(0)
    m = Mamba(16, d_state=4, bidirectional=True, divide_out=True, scan_backend="torch")
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        x = torch.randn(2, 19, 16)
        torch.testing.assert_close(m._forward_kernel(x), m(x), rtol=1e-5, atol=1e-6)


def test_kernel_backend_is_optional():
    inp = {k: v.float() for k, v in scan_inputs(length=5).items()}
    if not kernels_available():
        with pytest.raises(ConfigError, match="mamba_ssm"):
            selective_scan(**inp, delta_softplus=True, backend="mamba_ssm")
    with pytest.raises(ConfigError, match="scan backend"):
        selective_scan(**inp, backend="cuda")  # unknown (triton is a backend: tests/test_mamba_triton.py)
    with pytest.raises(ConfigError, match="scan_backend"):
        Mamba(16, scan_backend="cuda")


@pytest.mark.skipif(not kernels_available(), reason="mamba_ssm and CUDA not available")
def test_cuda_kernel_matches_the_pytorch_scan():
    inp = {k: v.float().cuda() for k, v in scan_inputs(length=300).items()}
    torch.testing.assert_close(selective_scan(**inp, delta_softplus=True, backend="mamba_ssm"),
                               selective_scan(**inp, delta_softplus=True, backend="torch"), rtol=1e-3, atol=1e-3)
