"""The Triton selective scan (`ditk.models._scan_triton`), forward and backward, through Triton's CPU interpreter.

Triton decides at import whether its kernels are interpreted (TRITON_INTERPRET=1), so the checks run in one
subprocess (this file run as a script) with the variable set; each test asserts on its check's result. Oracles:
a float64 token-by-token loop of the recurrence and autograd through it, transformers-checked PyTorch scan
(`scan_backend=torch`) for the DiS and Dimba models.
"""

import json
import os
import subprocess
import sys
import traceback
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]


def loop_scan(dt, u, A, B, C, bias, D, softplus, reverse_from):
    """float64 reference of the token-major contract, one token at a time: dt, u (G, L, d); A (G, n, d);
    B, C (G, L, n); bias, D (G, d) or None; sequences g >= reverse_from scanned from the end."""
    dt, u, A, B, C = (x.double() for x in (dt, u, A, B, C))
    G, L, d = dt.shape
    out = []
    for g in range(G):
        x = dt[g] if bias is None else dt[g] + bias[g].double()
        delta = F.softplus(x) if softplus else x
        h = torch.zeros(A.shape[1:], dtype=torch.float64)
        ys = [None] * L
        for t in (range(L - 1, -1, -1) if g >= reverse_from else range(L)):
            h = torch.exp(delta[t] * A[g]) * h + (delta[t] * u[g, t]) * B[g, t, :, None]
            ys[t] = (C[g, t, :, None] * h).sum(0) + (0 if D is None else D[g].double() * u[g, t])
        out.append(torch.stack(ys))
    return torch.stack(out)


def inputs(G, L, d, n, seed, bias=True, D=True, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    x = [r(G, L, d) - 1, r(G, L, d), -torch.exp(r(G, n, d) * 0.5), r(G, L, n), r(G, L, n),
         r(G, d) * 0.3 if bias else None, r(G, d) if D else None]
    return [None if t is None else t.to(dtype) for t in x]


#################################################################################
#                   Checks (run in the interpreted subprocess)                  #
#################################################################################

# (G, L, d, n, chunk, block_d, reverse_from, softplus, bias, D): lengths around chunk boundaries (a partial
# last chunk, one chunk, a chunk per token), channels across block boundaries, d_state not a power of two.
CASES = [(2, 1, 3, 2, None, 4, 1, True, True, True), (3, 17, 6, 3, 4, 4, 1, True, True, True),
         (2, 16, 5, 4, 4, 8, 2, True, False, True), (2, 23, 9, 5, None, 8, 0, False, True, False),
         (2, 9, 4, 2, 1, 2, 1, True, True, True), (1, 30, 7, 4, 7, 4, 1, True, True, True)]


def check_float64_outputs_and_gradients_equal_the_loop():
    """Outputs to 1e-12 and the gradients of all seven inputs to 1e-10 against autograd through the loop."""
    from ditk.models._scan_triton import triton_scan
    for i, (G, L, d, n, chunk, bd, rev, sp, has_bias, has_D) in enumerate(CASES):
        x = [t if t is None else t.requires_grad_() for t in inputs(G, L, d, n, seed=i, bias=has_bias, D=has_D)]
        y = triton_scan(*x, softplus=sp, reverse_from=rev, chunk=chunk, block_d=bd)
        ref = loop_scan(*x, sp, rev)
        assert y.dtype == torch.float64
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12, msg=f"case {i}")
        w = torch.randn(G, L, d, generator=torch.Generator().manual_seed(i), dtype=torch.float64)
        live = [t for t in x if t is not None]
        ours = torch.autograd.grad((y * w).sum(), live)
        grads = torch.autograd.grad((ref * w).sum(), live)
        names = [nm for nm, t in zip(["dt", "u", "A", "B", "C", "bias", "D"], x) if t is not None]
        for name, a, b in zip(names, ours, grads):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-10, msg=f"case {i}: {name}")


def check_float32_and_reversed_scans():
    """float32 (what models run: float32 state) close to the float64 loop in outputs and gradients, with
    dt + bias above softplus's threshold 20 in places; a reversed sequence equals the forward scan of its flip."""
    from ditk.models._scan_triton import triton_scan
    x = inputs(3, 19, 6, 4, seed=20)
    x[0][0, 3:6] += 25.0
    x = [t.requires_grad_() for t in x]
    w = torch.randn(3, 19, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ref = loop_scan(*x, True, 1)
    grads = torch.autograd.grad((ref * w).sum(), x)
    x32 = [t.detach().float().requires_grad_() for t in x]
    y32 = triton_scan(*x32, softplus=True, reverse_from=1, chunk=5, block_d=4)
    assert y32.dtype == torch.float32
    torch.testing.assert_close(y32.double(), ref, rtol=1e-4, atol=1e-4)
    ours = torch.autograd.grad((y32 * w.float()).sum(), x32)
    for name, a, b in zip(["dt", "u", "A", "B", "C", "bias", "D"], ours, grads):
        torch.testing.assert_close(a.double(), b, rtol=1e-4, atol=1e-4, msg=f"float32: {name}")
    with torch.no_grad():  # no gradient: no saved states
        x = inputs(2, 11, 4, 3, seed=9)
        both = triton_scan(*x, softplus=True, reverse_from=1, block_d=4)
        flip = lambda t: t.flip(1) if t.dim() == 3 and t.shape[1] == 11 else t  # noqa: E731
        fwd = triton_scan(*(flip(t[1:]) for t in x), softplus=True, block_d=4)
    torch.testing.assert_close(both[1:], fwd.flip(1), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(both, loop_scan(*x, True, 1), rtol=1e-12, atol=1e-12)


def check_scan_and_selective_scan_dispatch_to_triton():
    """`mamba.scan` / `selective_scan` with backend="triton" (z gating, shared D and bias, both directions)
    equal the PyTorch backend, in outputs and gradients."""
    import ditk.models._scan_triton as st
    import ditk.models.mamba as mamba
    calls = []
    real = st.triton_scan
    st.triton_scan = lambda *a, **k: calls.append(1) or real(*a, **k)
    x = inputs(4, 21, 6, 3, seed=30)
    dt, u, A, B, C, bias, D = (t.requires_grad_() for t in x)
    out = {}
    for backend in ("triton", "torch"):
        y = mamba.scan(u, dt, A, B, C, D[0], bias[0], True, backend=backend, reverse_from=2)
        out[backend] = [y, *torch.autograd.grad((y * y).sum(), [dt, u, A, B, C, D, bias])]
    for a, b in zip(out["triton"], out["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    g = torch.Generator().manual_seed(3)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64).requires_grad_()  # noqa: E731
    args = dict(u=r(2, 6, 13), delta=r(2, 6, 13), A=-torch.exp(r(6, 4)), B=r(2, 4, 13), C=r(2, 4, 13), D=r(6),
                z=r(2, 6, 13), delta_bias=r(6))
    res = {}
    for backend in ("triton", "torch"):
        y = mamba.selective_scan(**args, delta_softplus=True, backend=backend)
        res[backend] = [y, *torch.autograd.grad((y * y).sum(), list(args.values()))]
    for a, b in zip(res["triton"], res["torch"]):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)
    assert len(calls) == 2  # the triton backend really ran the kernel (not a silent fallback)


def _models_agree(build, call):
    """A model built with scan_backend=triton and the same one with torch: equal outputs and parameter
    gradients (float64, so the comparison is tight), and the Triton kernel ran in every Mamba mixer."""
    import ditk.models._scan_triton as st
    st.BLOCK_D = 64  # d_inner = 64: one channel block per sequence (the interpreter runs programs one by one)
    ref = build("torch").double()
    ours = build("triton").double()
    ours.load_state_dict(ref.state_dict())
    with torch.no_grad():  # move the parameters off their initialisation (zero-initialised heads, ...)
        g = torch.Generator().manual_seed(0)
        for p, q in zip(ref.parameters(), ours.parameters()):
            p.add_(torch.randn(p.shape, generator=g, dtype=p.dtype) * 0.05)
            q.copy_(p)
    launches = []
    real = st.TritonScan.apply
    st.TritonScan.apply = lambda *a: launches.append(1) or real(*a)
    try:
        y_ours = call(ours)
    finally:
        del st.TritonScan.apply  # back to autograd.Function's own
    y_ref = call(ref)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-9, atol=1e-9)
    w = torch.randn(y_ref.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    g_ours = torch.autograd.grad((y_ours * w).sum(), list(ours.parameters()), allow_unused=True)
    g_ref = torch.autograd.grad((y_ref * w).sum(), list(ref.parameters()), allow_unused=True)
    names = [n for n, _ in ref.named_parameters()]
    for name, a, b in zip(names, g_ours, g_ref):
        assert (a is None) == (b is None), name
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-9, msg=name)
    mixers = sum(1 for m in ours.modules() if type(m).__name__ == "Mamba")
    assert len(launches) == mixers > 0, (len(launches), mixers)
    assert any(n.endswith("A_b_log") for n in names)  # bidirectional mixers: both directions' gradients checked


def check_dis_with_triton_equals_torch():
    from ditk.models.dis import DiS

    def build(backend):
        torch.manual_seed(0)
        return DiS(input_size=4, patch_size=2, in_channels=1, hidden_size=32, depth=2, d_state=4, num_classes=5,
                   scan_backend=backend)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    _models_agree(build, lambda m: m(x, torch.tensor([3.0, 700.0], dtype=torch.float64), torch.tensor([1, 4])))


def check_dimba_with_triton_equals_torch():
    from ditk.models.dimba import Dimba

    def build(backend):
        torch.manual_seed(0)
        return Dimba(input_size=4, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                     caption_channels=12, d_state=4, num_classes=10, scan_backend=backend)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64)
    ctx = torch.randn(2, 5, 12, generator=g, dtype=torch.float64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    _models_agree(build, lambda m: m(x, torch.tensor([3.0, 700.0], dtype=torch.float64), ctx, mask))


CHECKS = {name: fn for name, fn in dict(globals()).items() if name.startswith("check_")}


def run_checks() -> dict:
    results = {}
    for name, fn in CHECKS.items():
        try:
            fn()
            results[name] = "ok"
        except Exception:  # report every check, not only the first failure
            results[name] = traceback.format_exc()[-3000:]
    return results


if __name__ == "__main__":
    torch.set_num_threads(1)
    print(json.dumps(run_checks()))
    sys.exit(0)


#################################################################################
#                                    Tests                                      #
#################################################################################


@pytest.fixture(scope="module")
def interpreted_results():
    pytest.importorskip("triton", reason="Triton is not installed (it ships with CUDA builds of PyTorch)")
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": os.pathsep.join(
        [str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve())], env=env, capture_output=True, text=True,
                          timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("check", list(CHECKS))
def test_in_the_triton_interpreter(interpreted_results, check):
    assert interpreted_results[check] == "ok", interpreted_results[check]


def test_reference_loop_is_the_recurrence():
    """The oracle itself, against the PyTorch scan (checked against transformers in test_mamba.py)."""
    import ditk.models.mamba as mamba
    dt, u, A, B, C, bias, D = inputs(3, 12, 5, 3, seed=4)
    ref = mamba.scan(u, dt, A, B, C, D, bias, True, backend="torch", reverse_from=1)
    torch.testing.assert_close(loop_scan(dt, u, A, B, C, bias, D, True, 1), ref, rtol=1e-10, atol=1e-10)


def test_triton_backend_needs_cuda_outside_the_interpreter():
    pytest.importorskip("triton")
    import ditk.models.mamba as mamba
    from ditk.errors import ConfigError
    from ditk.models import _scan_triton
    if _scan_triton.interpreted():
        pytest.skip("TRITON_INTERPRET=1 in this process: CPU tensors are allowed")
    x = inputs(2, 5, 4, 2, seed=0, dtype=torch.float32)
    with pytest.raises(ConfigError, match="scan backend 'triton' needs CUDA tensors"):
        mamba.scan(x[1], x[0], *x[2:5], backend="triton")
    assert not mamba._use_triton("auto", x[0])  # auto on CPU: the compiled or PyTorch scan, as before
    assert mamba._use_triton("auto", SimpleNamespace(is_cuda=True))  # auto on CUDA (without mamba_ssm): Triton
    assert not mamba._use_triton("torch", SimpleNamespace(is_cuda=True))
    assert "triton" in mamba.SCAN_BACKENDS


def test_kernels_compile_for_a_gpu_without_one():
    """The interpreter checks the arithmetic; this checks that Triton lowers both kernels to sm_90 code (PTX
    assembled by the ptxas that ships with Triton; no GPU or driver needed), float32 with every option on."""
    triton = pytest.importorskip("triton")
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError:
        pytest.skip("this Triton version has no ahead-of-time compile API")
    if not (Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "ptxas").exists():
        pytest.skip("Triton's NVIDIA backend (ptxas) is not installed")
    from ditk.models import _scan_triton as st
    if st.interpreted():
        pytest.skip("TRITON_INTERPRET=1 in this process")
    ints = ["L", "d", "n", "K", "reverse_from"]
    options = dict(HAS_BIAS=True, HAS_D=True, SOFTPLUS=True, BLOCK_D=st.BLOCK_D, BLOCK_N=16)
    for fn, extra in [(st._scan_fwd_kernel, {"SAVE": True}), (st._scan_bwd_kernel, {})]:
        cx = {**options, **extra}
        names = fn.arg_names
        sig = {a: "constexpr" if a in cx else "i32" if a in ints else "*fp32" for a in names}
        kernel = triton.compile(ASTSource(fn, sig, constexprs={(names.index(k),): v for k, v in cx.items()}),
                                target=GPUTarget("cuda", 90, 32))
        assert ".entry " + fn.__name__ in kernel.asm["ptx"] and len(kernel.asm["cubin"]) > 1000
