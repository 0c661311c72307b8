"""The compiled CPU kernels (selective scan with its backward, Bi-WKV inference) against float64 references,
the PyTorch forms they replace, and their fallback when no C++ compiler is there."""

import pytest
import torch
import torch.nn.functional as F

from ditk.errors import ConfigError
from ditk.models import _cpu_kernels, _scan_cpu, _wkv_cpu
from ditk.models.mamba import Mamba, scan
from ditk.models.rwkv import BiWKV, bi_wkv

needs_compiler = pytest.mark.skipif(_scan_cpu.library() is None or _wkv_cpu.library() is None,
                                    reason="no C++ compiler: the kernels cannot be built here")


def loop_scan(dt, u, A, B, C, bias, D):
    """float64, token by token (Mamba Alg. 2): delta = softplus(dt + bias), h_t = exp(delta A) h + delta u B,
    y_t = C . h_t + D u. dt, u (G, L, d); A (G, n, d); B, C (G, L, n); bias, D (G, d)."""
    delta = F.softplus(dt + bias[:, None])
    h = torch.zeros(A.shape, dtype=torch.float64)
    ys = []
    for t in range(dt.shape[1]):
        h = torch.exp(delta[:, t, None, :] * A) * h + (delta * u)[:, t, None, :] * B[:, t, :, None]
        ys.append((h * C[:, t, :, None]).sum(1) + D * u[:, t])
    return torch.stack(ys, dim=1)


def scan_inputs(groups=2, length=70, d=70, n=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    # dt around softplus's threshold too (a few entries above 20 pass through), both signs
    dt = r(groups, length, d) * 2 - 1
    dt[0, 0, :2] = 25.0
    return [dt, r(groups, length, d), -torch.exp(r(groups, n, d) * 0.5), r(groups, length, n), r(groups, length, n),
            r(groups, d) * 0.3, r(groups, d)]


@needs_compiler
@pytest.mark.parametrize("length", [1, 5, 63, 64, 65, 130])
def test_compiled_scan_equals_the_float64_loop(length, monkeypatch):
    monkeypatch.setattr(_scan_cpu, "CHUNK", 16)  # saved states every 16 tokens: several chunks, a partial one
    inp = scan_inputs(length=length, seed=length)  # d = 70: one full 64-channel block and a partial one
    ref = loop_scan(*inp)
    out = _scan_cpu.compiled_scan(*inp[:5], inp[5], inp[6], softplus=True)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10)
    out32 = _scan_cpu.compiled_scan(*(x.float() for x in inp[:5]), inp[5].float(), inp[6].float(), softplus=True)
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, rtol=1e-4, atol=1e-4)


@needs_compiler
def test_compiled_scan_gradients(monkeypatch):
    monkeypatch.setattr(_scan_cpu, "CHUNK", 4)  # backward recomputes 4-token chunks from the saved states
    inp = [x.requires_grad_() for x in scan_inputs(groups=2, length=11, d=3, n=2, seed=1)]
    assert torch.autograd.gradcheck(lambda *a: _scan_cpu.compiled_scan(*a, softplus=True), inp)
    monkeypatch.setattr(_scan_cpu, "CHUNK", 16)
    inp = [x.detach().requires_grad_() for x in scan_inputs(length=37, seed=2)]
    weight = torch.randn(2, 37, 70, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    ours = torch.autograd.grad((_scan_cpu.compiled_scan(*inp, softplus=True) * weight).sum(), inp)
    ref = torch.autograd.grad((loop_scan(*inp) * weight).sum(), inp)
    for name, a, b in zip(["dt", "u", "A", "B", "C", "bias", "D"], ours, ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9, msg=name)


@needs_compiler
@pytest.mark.parametrize("n", [16, 4, 17])
def test_vectorised_float32_scan_equals_the_float64_loop(n, monkeypatch):
    """float32 with d_state <= 16 takes the AVX-512 kernel where the CPU has it (registers per 16 channels,
    chunks of 32 tokens, a polynomial 2^x): d = 37 is two full 16-channel blocks and a masked one, 75 tokens
    are two full chunks and a partial one, the second sequence is scanned from its end; d_state 17 takes the
    generic loop. Forward to float32 accuracy, and the gradients of the backward, which restarts from the
    states this forward saved (every 16 tokens here)."""
    if n <= 16 and not _scan_cpu.vectorised_forward():
        pytest.skip("the CPU or compiler has no AVX-512: the generic loop is tested above")
    monkeypatch.setattr(_scan_cpu, "CHUNK", 16)
    inp = scan_inputs(groups=2, length=75, d=37, n=n, seed=n)
    ref = loop_scan(*[torch.cat([x[:1], x[1:].flip(1)]) if x.dim() == 3 and x.shape[1] == 75 else x
                      for x in inp])
    ref = torch.cat([ref[:1], ref[1:].flip(1)])
    x32 = [x.float().requires_grad_() for x in inp]
    out = _scan_cpu.compiled_scan(*x32, softplus=True, reverse_from=1)
    scale = ref.abs().max().item()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=2e-6 * scale)
    weight = torch.randn(ref.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    ours = torch.autograd.grad((out * weight.float()).sum(), x32)
    x64 = [x.detach().requires_grad_() for x in inp]
    flip = lambda x: torch.cat([x[:1], x[1:].flip(1)])  # noqa: E731
    ref = flip(loop_scan(*[flip(x) if x.dim() == 3 and x.shape[1] == 75 else x for x in x64]))
    grads = torch.autograd.grad((ref * weight).sum(), x64)
    for name, a, b in zip(["dt", "u", "A", "B", "C", "bias", "D"], ours, grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-5 * b.abs().max().item(), msg=name)


@needs_compiler
def test_vectorised_scan_decays_underflow_to_zero_and_softplus_passes_large_inputs():
    """Decays e^(delta A) far below float32's range are exactly 0 (h_t = delta_t u_t B_t), and dt + bias above
    20 passes through softplus, in the float32 kernel as in the float64 loop."""
    dt, u, A, B, C, bias, D = scan_inputs(groups=1, length=40, d=20, n=16, seed=9)
    A = A * 1e4
    dt[0, 5:9] = 30.0
    out = _scan_cpu.compiled_scan(*(x.float() for x in (dt, u, A, B, C, bias, D)), softplus=True)
    ref = loop_scan(dt, u, A, B, C, bias, D)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5 * ref.abs().max().item())


@needs_compiler
def test_compiled_scan_is_exact_for_decays_too_fast_to_factorise():
    """The plain recurrence has no factorised form to overflow: |A| * delta of hundreds stays finite."""
    dt, u, A, B, C, bias, D = scan_inputs(length=40, d=5, seed=3)
    A = A * 300
    out = scan(u.float(), dt.float(), A.float(), B.float(), C.float(), D.float(), bias.float(), softplus=True)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), loop_scan(dt, u, A, B, C, bias, D), rtol=1e-4, atol=1e-4)


@needs_compiler
def test_compiled_mixer_equals_the_pytorch_mixer():
    """The bidirectional mixer (DiS / Dimba) with the compiled scan against the PyTorch path (which
    test_mamba.py checks against transformers' MambaMixer): outputs and every gradient, float64."""
    torch.manual_seed(0)
    ref = Mamba(16, d_state=4, bidirectional=True, divide_out=True, scan_backend="torch").double()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    ours = Mamba(16, d_state=4, bidirectional=True, divide_out=True, scan_backend="compiled").double()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    out_ref, out = ref(xs[0]), ours(xs[1])
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    weight = torch.randn_like(out)
    (out_ref * weight).sum().backward()
    (out * weight).sum().backward()
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-9, atol=1e-10)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10, msg=name)


def wkv_recurrent(w, u, k, v):
    """float64 Bi-WKV as two plain recurrences (test_rwkv.py's oracle): left and right sums plus the bonus."""
    decay = torch.exp(-w)
    left, a, b = [], torch.zeros_like(v[:, 0]), torch.zeros_like(v[:, 0])
    for t in range(k.shape[1]):
        left.append((a, b))
        a, b = decay * a + torch.exp(k[:, t]) * v[:, t], decay * b + torch.exp(k[:, t])
    y, c, d = torch.empty_like(v), torch.zeros_like(v[:, 0]), torch.zeros_like(v[:, 0])
    for t in reversed(range(k.shape[1])):
        bonus = torch.exp(u + k[:, t])
        y[:, t] = (left[t][0] + c + bonus * v[:, t]) / (left[t][1] + d + bonus)
        c, d = decay * c + torch.exp(k[:, t]) * v[:, t], decay * d + torch.exp(k[:, t])
    return y


def wkv_inputs(t_len, chans=20, k_scale=2.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = (torch.rand(chans, generator=g, dtype=torch.float64) * 8 - 5) / t_len  # negative decays too
    u = torch.randn(chans, generator=g, dtype=torch.float64) / t_len
    return w, u, torch.randn(2, t_len, chans, generator=g, dtype=torch.float64) * k_scale, \
        torch.randn(2, t_len, chans, generator=g, dtype=torch.float64)


@needs_compiler
@pytest.mark.parametrize("t_len", [1, 2, 17, 100])
def test_compiled_bi_wkv_equals_the_float64_recurrence(t_len):
    w, u, k, v = wkv_inputs(t_len, seed=t_len)
    ref = wkv_recurrent(w, u, k, v)
    torch.testing.assert_close(_wkv_cpu.bi_wkv_cpu(w, u, k, v), ref, rtol=1e-12, atol=1e-12)
    out32 = _wkv_cpu.bi_wkv_cpu(*(x.float() for x in (w, u, k, v)))
    assert out32.dtype == torch.float32
    torch.testing.assert_close(out32.double(), ref, rtol=1e-5, atol=1e-5)


@needs_compiler
def test_compiled_bi_wkv_large_keys_and_decays_stay_finite():
    w, u, k, v = wkv_inputs(256, chans=8, k_scale=40.0, seed=1)
    w = w * 4
    out = _wkv_cpu.bi_wkv_cpu(*(x.float() for x in (w, u, k, v)))
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.double(), bi_wkv(w, u, k, v), rtol=1e-4, atol=1e-5)


@needs_compiler
def test_bi_wkv_module_uses_the_kernel_only_without_gradients(monkeypatch):
    w, u, k, v = (x.float() for x in wkv_inputs(30, seed=2))
    calls = []
    kernel = _wkv_cpu.bi_wkv_cpu
    monkeypatch.setattr(_wkv_cpu, "bi_wkv_cpu", lambda *a: calls.append(1) or kernel(*a))
    module = BiWKV("auto")
    with torch.no_grad():
        torch.testing.assert_close(module(w, u, k, v), bi_wkv(w, u, k, v), rtol=1e-5, atol=1e-6)
    assert calls == [1]
    v = v.requires_grad_()
    module(w, u, k, v).sum().backward()  # the PyTorch form: differentiable
    assert calls == [1] and v.grad is not None


def test_without_a_compiler_auto_falls_back_and_compiled_says_why(monkeypatch, tmp_path):
    monkeypatch.setenv("DITK_CACHE_DIR", str(tmp_path))  # no cached library to find
    monkeypatch.setenv("CXX", "false")  # a "compiler" that always fails
    monkeypatch.setattr(_cpu_kernels, "_loaded", {})
    monkeypatch.setattr(_cpu_kernels, "_errors", {})
    dt, u, A, B, C, bias, D = (x.float() for x in scan_inputs(length=9, d=5, seed=4))
    ref = loop_scan(*(x.double() for x in (dt, u, A, B, C, bias, D)))
    torch.testing.assert_close(scan(u, dt, A, B, C, D, bias, softplus=True).double(), ref, rtol=1e-4, atol=1e-4)
    with pytest.raises(ConfigError, match="compiled.*C\\+\\+ compiler"):
        scan(u, dt, A, B, C, D, bias, softplus=True, backend="compiled")
    w, uu, k, v = (x.float() for x in wkv_inputs(9, seed=5))
    with torch.no_grad():
        torch.testing.assert_close(BiWKV("auto")(w, uu, k, v), bi_wkv(w, uu, k, v))
        with pytest.raises(ConfigError, match="wkv_impl=compiled"):
            BiWKV("compiled")(w, uu, k, v)
    assert not any(tmp_path.rglob("*.so"))
    monkeypatch.setenv("DITK_CPU_KERNELS", "0")  # switched off: the same fallback, no build attempted
    monkeypatch.setattr(_cpu_kernels, "_loaded", {})
    assert _scan_cpu.library() is None and _wkv_cpu.library() is None


@needs_compiler
def test_reversed_sequences_equal_the_flipped_scan():
    """reverse_from: sequences from that index on are scanned from their end, in the compiled kernel (no
    flipped copies) and in the PyTorch fallback (flip, scan, flip back); both equal scanning a flipped copy."""
    dt, u, A, B, C, bias, D = scan_inputs(groups=3, length=21, d=6, seed=6)
    flip = lambda x: torch.cat([x[:1], x[1:].flip(1)])  # noqa: E731
    ref = flip(loop_scan(flip(dt), flip(u), A, flip(B), flip(C), bias, D))
    for backend in ("compiled", "torch"):
        out = scan(u, dt, A, B, C, D, bias, softplus=True, backend=backend, reverse_from=1)
        torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-10, msg=backend)


def test_no_compiler_on_path_is_reported_not_raised(monkeypatch):
    monkeypatch.setattr(_cpu_kernels, "compiler", lambda: None)
    monkeypatch.setattr(_cpu_kernels, "_loaded", {})
    monkeypatch.setattr(_cpu_kernels, "_errors", {})
    assert _scan_cpu.library() is None
    assert "no C++ compiler" in _cpu_kernels.error(_scan_cpu.NAME)
    m = Mamba(8, d_state=2, bidirectional=True)  # auto: the PyTorch path, same result as scan_backend=torch
    ref = Mamba(8, d_state=2, bidirectional=True, scan_backend="torch")
    ref.load_state_dict(m.state_dict())
    x = torch.randn(1, 9, 8)
    torch.testing.assert_close(m(x), ref(x))


@needs_compiler
@pytest.mark.parametrize("bidirectional,conv_bias,d_conv,length,batch", [
    (False, True, 4, 13, 2),  # one direction (a plain Mamba mixer)
    (True, False, 3, 2, 3),  # no conv bias, another kernel width, fewer tokens than the kernel
    (True, True, 4, 1, 1),  # a single token
])
def test_compiled_mixer_variants_equal_the_pytorch_mixer(bidirectional, conv_bias, d_conv, length, batch):
    torch.manual_seed(1)
    kw = dict(d_state=3, d_conv=d_conv, bidirectional=bidirectional, conv_bias=conv_bias)
    ref = Mamba(8, scan_backend="torch", **kw).double()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    ours = Mamba(8, scan_backend="compiled", **kw).double()
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(batch, length, 8, dtype=torch.float64)
    xs = [x.clone().requires_grad_() for _ in range(2)]
    out_ref, out = ref(xs[0]), ours(xs[1])
    torch.testing.assert_close(out, out_ref, rtol=1e-10, atol=1e-10)
    out_ref.sum().backward()
    out.sum().backward()
    torch.testing.assert_close(xs[1].grad, xs[0].grad, rtol=1e-9, atol=1e-10)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-9, atol=1e-10, msg=name)
    with torch.no_grad():  # bfloat16 models keep working (the kernels take float32/64: the PyTorch conv path)
        half = ours.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16 and torch.isfinite(half.float()).all()


@needs_compiler
def test_fused_gate_equals_its_pytorch_form_with_gradients():
    """The mixer's output gate (sum of directions, optional 1/2, SiLU(z) on a strided view of in_proj's
    output) in one compiled pass: values and gradcheck against 0.5 * (y_fwd + y_rev) * silu(z), float64."""
    g = torch.Generator().manual_seed(0)
    y = torch.randn(2, 2, 5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    xz = torch.randn(2, 5, 14, dtype=torch.float64, generator=g, requires_grad=True)
    for scale in (0.5, 1.0):
        out = _scan_cpu.gate(y, xz[..., 7:], scale)
        torch.testing.assert_close(out, scale * y.sum(0) * F.silu(xz[..., 7:]), rtol=1e-12, atol=1e-12)
        assert torch.autograd.gradcheck(lambda a, b: _scan_cpu.gate(a, b[..., 7:], scale), (y, xz))
    one = y[:1].detach().requires_grad_()  # one direction
    assert torch.autograd.gradcheck(lambda a, b: _scan_cpu.gate(a, b[..., 7:]), (one, xz))


@needs_compiler
def test_compiled_mixer_inference_path_equals_the_training_path():
    """Without gradients the mixer calls the kernels without autograd nodes (`conv_silu`, `compiled_scan`,
    `gate`): the same output as with them."""
    torch.manual_seed(2)
    m = Mamba(8, d_state=3, bidirectional=True, divide_out=True, scan_backend="compiled")
    x = torch.randn(3, 11, 8)
    with torch.no_grad():
        fast = m(x)
    torch.testing.assert_close(fast, m(x.requires_grad_()).detach(), rtol=1e-6, atol=1e-7)
