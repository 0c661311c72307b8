"""ViDiT-Q's low-bit parts: static-dynamic channel balancing (scaling + Hadamard rotation) is exact in float64, and
the mixed-precision allocator is the exact optimum of its integer program and never exceeds the budget."""

import itertools

import pytest
import torch

from ditk.errors import ConfigError
from ditk.quantize.layers import FakeQuantLinear
from ditk.quantize.methods.viditq import balanced_weight, phase_errors
from ditk.quantize.mixed import allocate
from ditk.quantize.rotation import block_hadamard, block_size
from ditk.quantize.smoothing import balance_factors


def test_scaling_plus_rotation_leaves_the_layer_output_unchanged_in_float64():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 96, generator=g, dtype=torch.float64) * torch.logspace(-1, 2, 96, dtype=torch.float64)
    w = torch.randn(24, 96, generator=g, dtype=torch.float64)
    s = balance_factors(x.abs().amax(0), w, 0.3)
    block = block_size(96)
    assert block == 32 and not torch.allclose(s, torch.ones_like(s))
    r = block_hadamard(96, block, torch.float64)
    torch.testing.assert_close(r @ r.T, torch.eye(96, dtype=torch.float64), rtol=0, atol=1e-12)
    x2 = (x / s) @ r  # X'' = (X diag(s)^-1) R
    torch.testing.assert_close(x2 @ balanced_weight(w, s, block).T, x @ w.T, rtol=1e-12, atol=1e-10)
    # the rotation spreads the static outliers: the largest channel of X'' is much closer to the typical one
    spread = lambda v: float(v.abs().amax(0).max() / v.abs().amax(0).median())  # noqa: E731
    assert spread(x2) < spread(x / s) < spread(x)
    # the fake-quant layer applies the same transform at run time: with no quantization it is the original Linear
    # (to float32 rounding: its Hadamard buffer is built in float32)
    layer = FakeQuantLinear(96, 24, bias=False, smooth=True, rotation=block).double()
    with torch.no_grad():
        layer.weight.copy_(balanced_weight(w, s, block))
        layer.smooth.copy_(s)
    torch.testing.assert_close(layer(x), x @ w.T, rtol=1e-6, atol=1e-4)


def brute_force(costs, losses, capacity):
    feasible = [c for c in itertools.product(*[range(len(r)) for r in costs])
                if sum(costs[i][o] for i, o in enumerate(c)) <= capacity]
    return min(sum(losses[i][o] for i, o in enumerate(c)) for c in feasible)


@pytest.mark.parametrize("seed", range(6))
def test_allocator_is_the_exact_optimum_within_the_budget(seed):
    rng = torch.Generator().manual_seed(seed)
    n, k = 7, 3
    costs = (torch.randint(1, 9, (n, k), generator=rng) * 96).tolist()  # multiples of a width: the gcd step matters
    losses = torch.rand(n, k, generator=rng, dtype=torch.float64).tolist()
    capacity = int(sum(min(r) for r in costs) + torch.randint(0, 30, (1,), generator=rng) * 96)
    picked = allocate(costs, losses, capacity)
    assert sum(costs[i][o] for i, o in enumerate(picked)) <= capacity
    assert sum(losses[i][o] for i, o in enumerate(picked)) == pytest.approx(brute_force(costs, losses, capacity))


def test_allocator_beats_greedy_where_greedy_is_wrong_and_refuses_an_impossible_budget():
    # promote (cost 2 each, gains 3 + 3) or (cost 3, gain 5): budget 4 -> both small ones (gain 6); a greedy by
    # gain per cost takes the big one first (5/3 > 3/2) and then has no room left
    costs = [[0, 3], [0, 2], [0, 2]]
    losses = [[5.0, 0.0], [3.0, 0.0], [3.0, 0.0]]
    assert allocate(costs, losses, 4) == [0, 1, 1]
    with pytest.raises(ConfigError):
        allocate([[2, 3]], [[1.0, 0.0]], 1)


def test_phase_errors_split_the_rows_by_noise_level():
    ref = torch.ones(4, 3)
    out = ref.clone()
    out[0] += 1  # an error only at the high-noise row t = 900
    content, detail = phase_errors(out, ref, torch.tensor([900, 800, 10, 20]))
    assert content == pytest.approx(3 / 6) and detail == 0


def test_viditq_w4a8_mixed_precision_respects_its_budget(trained_run, tmp_path, monkeypatch):
    from ditk.quantize.api import quantize
    from ditk.quantize.checks import CalibSettings

    monkeypatch.setenv("DITK_CACHE_DIR", str(tmp_path / "cache"))
    _, manifest, model = quantize(str(trained_run), method="viditq", wbits=4, abits=8, options={"mp_extra": 0.25},
                                  out=str(tmp_path / "q"), calib=CalibSettings(num=2, timesteps=2), progress=False)
    mixed = manifest["method_report"]["mixed"]
    assert mixed["bitops_vs_uniform"] <= 1.25 + 1e-9 and mixed["promoted"]  # something was worth promoting
    bitops = {n: r["weight_bits"] * r["act_bits"] * model.get_submodule(n).weight.numel()
              for n, r in manifest["layers"].items()}
    uniform = sum(32 * model.get_submodule(n).weight.numel() for n in manifest["layers"])
    assert sum(bitops.values()) <= 1.25 * uniform
    assert {(r["weight_bits"], r["act_bits"]) for r in manifest["layers"].values()} <= {(4, 8), (8, 8)}
    assert all(r["balancing"] == "scaling+rotation" for r in manifest["layers"].values())
