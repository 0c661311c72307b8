"""Every degradation operator of `ditk restore`: adjoint test, A A^+ A = A, its Gram decomposition and oracles."""

import pytest
import torch
import torch.nn.functional as F

from ditk.errors import ConfigError
from ditk.restore.operators import TASKS, BicubicSR, build_operator, degrade

SHAPE = (3, 16, 16)
TASK_OPTIONS = {"inpaint-mask": None}  # needs a file: built in its own test


def _ops(tmp_path):
    from PIL import Image
    import numpy as np

    mask = np.full((16, 16), 255, np.uint8)
    mask[4:9, 2:12] = 0
    Image.fromarray(mask).save(tmp_path / "mask.png")
    ops = {}
    for name in TASKS:
        opts = {"mask": str(tmp_path / "mask.png")} if name == "inpaint-mask" else {}
        if name == "sr8-bicubic" or name == "sr8":
            ops[name] = build_operator(name, (3, 32, 32), opts)
        else:
            ops[name] = build_operator(name, SHAPE, opts)
    return ops


def test_adjoint_pinv_and_gram(tmp_path):
    g = torch.Generator().manual_seed(0)
    for name, op in _ops(tmp_path).items():
        x = torch.randn(2, *op.shape, generator=g, dtype=torch.float32)
        y = torch.randn(2, *op.y_shape(), generator=g)
        assert op.A(x).shape == y.shape, name
        # <A x, y> = <x, A^T y>
        lhs, rhs = (op.A(x) * y).sum(), (x * op.At(y)).sum()
        assert torch.allclose(lhs, rhs, rtol=1e-4, atol=1e-4), (name, lhs, rhs)
        # A A^+ A = A (up to the singular values pinv treats as zero: tol * max)
        Ax = op.A(x)
        err = (op.A(op.pinv(Ax)) - Ax).norm() / Ax.norm()
        assert err < (op.pinv_tol if "blur" in name else 1e-5), (name, float(err))
        # A^+ A is a projector: A^+ A A^+ A x = A^+ A x
        p = op.pinv(op.A(x))
        assert torch.allclose(op.pinv(op.A(p)), p, atol=1e-4), name
        # the Gram decomposition: f = identity gives A A^T y; gram_solve inverts r2 A A^T + s2 I
        assert torch.allclose(op.gram_apply(y, lambda lam: lam), op.A(op.At(y)), atol=1e-5), name
        z = op.gram_solve(y, 0.7, 0.3)
        assert torch.allclose(0.7 * op.A(op.At(z)) + 0.3 * z, y, atol=1e-4), name
        # the Lipschitz constant is the largest eigenvalue of A^T A (power iteration)
        v = torch.randn(1, *op.shape, generator=g)
        for _ in range(200):
            v = op.At(op.A(v))
            v = v / v.norm()
        rayleigh, lip = float((op.At(op.A(v)) * v).sum()), op.lipschitz()
        assert 0.99 * lip <= rayleigh <= lip * (1 + 1e-4), name  # power iteration approaches it from below


def test_bicubic_matches_torch_antialiased_resize():
    op = BicubicSR((3, 32, 32), 4)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    ref = F.interpolate(x, size=(8, 8), mode="bicubic", antialias=True, align_corners=False)
    assert torch.allclose(op.A(x), ref, atol=1e-5)


def test_blur_is_the_kernel_convolution():
    op = build_operator("blur", (1, 24, 24), {"sigma": 1.5})
    x = torch.randn(1, 1, 24, 24, generator=torch.Generator().manual_seed(2))
    k = op.kernel
    r = k.shape[0] // 2
    padded = F.pad(x, (r, r, r, r), mode="circular")
    ref = F.conv2d(padded, k.flip(0, 1)[None, None])  # conv2d correlates: flip for a convolution
    assert torch.allclose(op.A(x), ref, atol=1e-5)


def test_known_structure():
    op = build_operator("sr4", (3, 32, 32))
    assert op.A(torch.ones(1, 3, 32, 32)).shape == (1, 3, 8, 8)
    box = build_operator("inpaint-box", (3, 32, 32))
    assert float(box.mask.mean()) == pytest.approx(0.75)
    rnd = build_operator("inpaint-random", (3, 32, 32))
    assert 0.4 < float(rnd.mask.mean()) < 0.6
    cs = build_operator("cs", (3, 32, 32), {"ratio": 0.25})
    assert cs.y_shape() == (3, 16, 16)
    assert torch.allclose(cs.M @ cs.M.T, torch.eye(16), atol=1e-5)  # orthonormal rows
    y = degrade(op, torch.zeros(64, 3, 32, 32), 0.05, torch.Generator().manual_seed(0))
    assert abs(float(y.std()) - 0.05) < 0.005


def test_bad_tasks_are_one_line_errors():
    with pytest.raises(ConfigError, match="did you mean 'sr4'"):
        build_operator("sr-4", SHAPE)
    with pytest.raises(ConfigError, match="did you mean 'colorize'"):
        build_operator("colourize", SHAPE)
    with pytest.raises(ConfigError, match="no option 'sigmaa'"):
        build_operator("blur", SHAPE, {"sigmaa": 1})
    with pytest.raises(ConfigError, match="divisible by 4"):
        build_operator("sr4", (3, 18, 18))
    with pytest.raises(ConfigError, match="RGB"):
        build_operator("colorize", (1, 8, 8))
