"""The pure-PyTorch selective scan and Mamba mixer against float64 sequential loops and transformers' MambaMixer."""

import pytest
import torch
import torch.nn.functional as F

from ditk.errors import ConfigError
from ditk.models.mamba import Mamba, _LinearScan, _scan, _SelectiveScan, kernels_available, linear_scan, selective_scan


def loop_recurrence(a, b, reverse=False, initial=None):
    """h_t = a_t h_{t-1} + b_t (or h_{t+1} when reverse), one step per token."""
    h = torch.zeros_like(a[0]) if initial is None else initial
    out = [None] * a.shape[0]
    steps = range(a.shape[0] - 1, -1, -1) if reverse else range(a.shape[0])
    for t in steps:
        h = a[t] * h + b[t]
        out[t] = h
    return torch.stack(out)


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


# Lengths around the chunk boundaries of the chunked scan (chunk = isqrt(L), remainder handled after).
LENGTHS = [1, 2, 3, 4, 5, 8, 17, 18, 63, 64, 65, 130]


@pytest.mark.parametrize("length", LENGTHS)
def test_linear_scan_equals_the_sequential_loop(length):
    g = torch.Generator().manual_seed(length)
    a = torch.rand(length, 2, 3, 4, generator=g, dtype=torch.float64)
    b = torch.randn(length, 2, 3, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(linear_scan(a, b), loop_recurrence(a, b), rtol=1e-12, atol=1e-12)
    init = torch.randn(2, 3, 4, generator=g, dtype=torch.float64)
    torch.testing.assert_close(_scan(a, b, reverse=True, initial=init), loop_recurrence(a, b, True, init),
                               rtol=1e-12, atol=1e-12)
    # writing the states over the input buffer (what the selective scan does) gives the same states
    buf = b.clone()
    _scan(a, buf, out=buf)
    torch.testing.assert_close(buf, loop_recurrence(a, b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("length", [1, 5, 17])
def test_scan_gradients_are_exact(length):
    g = torch.Generator().manual_seed(0)
    a = torch.rand(length, 2, 3, generator=g, dtype=torch.float64).requires_grad_()
    b = torch.randn(length, 2, 3, generator=g, dtype=torch.float64).requires_grad_()
    assert torch.autograd.gradcheck(_LinearScan.apply, (a, b))
    d, n = 3, 2
    args = (torch.rand(length, 2, d, generator=g, dtype=torch.float64) + 0.05,
            torch.randn(length, 2, d, generator=g, dtype=torch.float64),
            -torch.rand(d, n, generator=g, dtype=torch.float64) * 2 - 0.1,
            torch.randn(length, 2, n, generator=g, dtype=torch.float64),
            torch.randn(length, 2, n, generator=g, dtype=torch.float64))
    assert torch.autograd.gradcheck(_SelectiveScan.apply, tuple(x.requires_grad_() for x in args))


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
    x = torch.randn(2, 30, 16, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        ref = hf_slow_forward(fwd, x) + hf_slow_forward(bwd, x.flip(1)).flip(1)
        torch.testing.assert_close(ours(x), ref, rtol=1e-4, atol=1e-5)
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


def test_kernel_backend_is_optional():
    inp = {k: v.float() for k, v in scan_inputs(length=5).items()}
    if not kernels_available():
        with pytest.raises(ConfigError, match="mamba_ssm"):
            selective_scan(**inp, delta_softplus=True, backend="mamba_ssm")
    with pytest.raises(ConfigError, match="scan backend"):
        selective_scan(**inp, backend="triton")
    with pytest.raises(ConfigError, match="scan_backend"):
        Mamba(16, scan_backend="cuda")


@pytest.mark.skipif(not kernels_available(), reason="mamba_ssm and CUDA not available")
def test_cuda_kernel_matches_the_pytorch_scan():
    inp = {k: v.float().cuda() for k, v in scan_inputs(length=300).items()}
    torch.testing.assert_close(selective_scan(**inp, delta_softplus=True, backend="mamba_ssm"),
                               selective_scan(**inp, delta_softplus=True, backend="torch"), rtol=1e-3, atol=1e-3)
