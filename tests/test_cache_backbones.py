"""Every cache policy on every backbone with blocks (DiT, DiT-MoE, DiS, Dimba, Diffusion-RWKV, FluxMusic).

Oracles:
- nothing skipped (FORA/TaylorSeer/Delta-DiT interval 1, FBC/TeaCache threshold 0) => the samples are
  bit-identical to no cache, for a DDPM-family and a flow solver, with classifier-free guidance;
- a skipping configuration => the report counts exactly the schedule the policy defines;
- a model evaluated again on an unchanged input (same x, t, conditioning) with a maximally skipping
  configuration => the cached evaluation equals full compute up to float64 rounding: reused outputs, deltas
  and residuals are then exact. This checks the wiring of every skip: block states made of several tensors
  (Mamba's (hidden, residual), FluxMusic's text and music streams, which the model concatenates between its
  double- and single-stream blocks) and U-ViT long skips (RWKV, DiS), whose in-blocks feed out-blocks behind
  a cached Delta-DiT front range. Rows whose input did change are recomputed by the per-row policies.
"""

import math

import pytest
import torch

from ditk.cache import build_policy
from ditk.cache.adapters import long_skips
from ditk.objectives.ddpm import DDPM, DDPMConfig
from ditk.objectives.flow import FlowConfig, RectifiedFlow
from ditk.sampling import sample

POLICIES = ["fora", "taylorseer", "delta-dit", "fbc", "teacache"]
BACKBONES = ["dit", "dit-moe", "dydit", "dis", "dimba", "diffusion-rwkv", "fluxmusic"]
NO_SKIP = {"fora": {"interval": 1}, "taylorseer": {"interval": 1}, "delta-dit": {"interval": 1},
           "fbc": {"threshold": 0.0}, "teacache": {"threshold": 0.0}}
N = 2  # images (4 rows with CFG)


def _randomise(model, seed=1):
    """Every weight random: zero-initialised gates and output layers would make blocks the identity."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return model.eval().requires_grad_(False)


def build(name):
    """(model, cond, uncond, noise shape) for a tiny random-weight model of the backbone."""
    from ditk.models.dimba import Dimba
    from ditk.models.dis import DiS
    from ditk.models.dit import DiT
    from ditk.models.dit_moe import DiTMoE
    from ditk.models.dydit import DyDiT
    from ditk.models.mmdit import FluxMusic
    from ditk.models.rwkv import DiffusionRWKV

    torch.manual_seed(0)
    image = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, learn_sigma=False)
    labels = {"y": torch.arange(N) % 10}, {"y": torch.full((N,), 10)}
    g = torch.Generator().manual_seed(2)
    context = torch.randn(N, 5, 16, generator=g)
    if name == "dit":
        model, (c, u) = DiT(depth=4, num_heads=2, num_classes=10, **image), labels
    elif name == "dit-moe":
        model, (c, u) = DiTMoE(num_experts=4, top_k=2, num_shared_experts=1, depth=3, num_heads=2, num_classes=10,
                               **image), labels
    elif name == "dydit":  # random routers: some tokens skip the MLP, some heads and MLP channel groups are off
        model, (c, u) = DyDiT(depth=3, num_heads=4, num_classes=10, **image), labels
    elif name == "dis":  # 5 blocks: 2 in, mid, 2 out with long skips
        model, (c, u) = DiS(depth=4, num_classes=10, scan_backend="torch", **image), labels
    elif name == "diffusion-rwkv":  # 5 blocks: 2 in, mid, 2 out with long skips
        model, (c, u) = DiffusionRWKV(depth=5, num_classes=10, wkv_impl="torch", **image), labels
    elif name == "dimba":  # Mamba blocks after layers 1 and 3 only: the residual stream starts as None
        mask = torch.tensor([[True] * 5, [True] * 3 + [False] * 2])
        model = Dimba(depth=4, num_heads=2, caption_channels=16, mamba_ratio=0.5, scan_backend="torch", **image)
        c, u = {"context": context, "context_mask": mask}, {"context": torch.zeros(N, 5, 16), "context_mask": mask}
    else:  # 2 double-stream + 2 single-stream blocks, 5 text tokens + 8 music tokens
        model = FluxMusic(input_size=4, frames=8, patch_size=2, in_channels=1, hidden_size=32, num_heads=2,
                          depth_double=2, depth_single=2, axes_dim=(4, 6, 6), context_dim=16, pooled_dim=8)
        c = {"context": context, "pooled": torch.randn(N, 8, generator=g)}
        u = {"context": torch.zeros(N, 5, 16), "pooled": torch.zeros(N, 8)}
    shape = (1, 4, 8) if name == "fluxmusic" else (1, 8, 8)
    model = _randomise(model)
    if name == "dydit":  # token-router output bias 0: blocks keep none, some or all of their tokens
        for block in model.blocks:
            block.token_selection.mlp_head[2].bias.zero_()
    return model, c, u, shape


@pytest.fixture(scope="module")
def backbones():
    return {name: build(name) for name in BACKBONES}


def run(entry, policy, solver, steps):
    model, c, u, shape = entry
    objective = RectifiedFlow(FlowConfig()) if solver in ("euler", "heun") else DDPM(DDPMConfig(variance="fixed_small"))
    noise = torch.randn(N, *shape, generator=torch.Generator().manual_seed(0))
    gens = [torch.Generator().manual_seed(100 + i) for i in range(N)]
    return sample(model, objective, noise, c, u, solver=solver, steps=steps, cfg_scale=3.0, generator=gens,
                  cache=policy)


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_nothing_skipped_is_bit_identical(backbones, backbone, policy):
    entry = backbones[backbone]
    for solver in ("ddpm", "heun"):  # ancestral DDPM; Heun (flow, two evaluations per step)
        reference = run(entry, None, solver, 3)
        p = build_policy(policy, NO_SKIP[policy])
        assert torch.equal(run(entry, p, solver, 3), reference), solver
        report = p.report()
        assert report["full_evaluations"] == report["model_evaluations"] == (3 if solver == "ddpm" else 5)
        assert report["trajectories"] == 2 * N and all(u["cached"] == 0 for u in report["units"].values())
    model = entry[0]
    assert all("forward" not in m.__dict__ for m in model.modules())  # every patch was undone


def expected_counts(policy, depth, units, steps):
    """{unit: (computed, cached)} and full evaluations that the policy's schedule defines (per trajectory)."""
    blocks = [f"blocks.{j}" for j in range(depth)]
    if policy == "fora":  # interval 3: evaluations 0, 3, 6
        full = math.ceil(steps / 3)
        return {u: (full, steps - full) for u in units}, full
    if policy == "taylorseer":  # first_enhance 2, interval 3: evaluations 0, 1, 4
        full = len([0, 1, 4])
        return {u: (full, steps - full) for u in units}, full
    if policy == "delta-dit":  # interval 2, k = 2 blocks, switch 4: 1, 3 cache the rear two, 5 the front two
        k = 2
        cached = {b: 2 * (j >= depth - k) + 1 * (j < k) for j, b in enumerate(blocks)}
        return {b: (steps - cached[b], cached[b]) for b in blocks}, math.ceil(steps / 2)
    if policy == "fbc":  # infinite threshold: blocks 1.. run at evaluation 0 only
        return {b: (steps, 0) if j == 0 else (1, steps - 1) for j, b in enumerate(blocks)}, 1
    return {b: (2, steps - 2) for b in blocks}, 2  # teacache, infinite threshold: the first and the last evaluation


SKIPPING = {"fora": {"interval": 3}, "taylorseer": {"interval": 3, "first_enhance": 2, "max_order": 1},
            "delta-dit": {"interval": 2, "blocks": 2, "switch": 4}, "fbc": {"threshold": 1e9},
            "teacache": {"threshold": 1e9}}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_skipping_counts_what_the_policy_says(backbones, backbone, policy):
    entry = backbones[backbone]
    steps = 7
    p = build_policy(policy, SKIPPING[policy])
    out = run(entry, p, "euler", steps)
    report = p.report()
    units = list(report["units"])
    expected, full = expected_counts(policy, len(entry[0].blocks), units, steps)
    assert {u: (v["computed"], v["cached"]) for u, v in report["units"].items()} == expected
    assert report["full_evaluations"] == full and report["model_evaluations"] == steps
    if policy in ("fora", "taylorseer"):  # every block's cached sub-modules are hooked
        assert {u.split(".")[1] for u in units} == {str(j) for j in range(len(entry[0].blocks))}
    assert torch.isfinite(out).all() and not torch.equal(out, run(entry, None, "euler", steps))


SKIP_ALL = {"fora": {"interval": 100}, "taylorseer": {"interval": 100, "first_enhance": 1},
            "delta-dit": {"interval": 100, "switch": 2}, "fbc": {"threshold": 1e-6}, "teacache": {"threshold": 1e-6}}


@pytest.mark.parametrize("policy", POLICIES)
@pytest.mark.parametrize("backbone", BACKBONES)
def test_cached_evaluation_of_an_unchanged_input_is_exact(backbones, backbone, policy):
    model, c, _, shape = backbones[backbone]
    model = model.double()
    try:
        cond = {k: v.double() if v.is_floating_point() else v for k, v in c.items()}
        x = torch.randn(N, *shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
        moved = x.clone()
        moved[1] += 1.0  # image 1 changes at evaluation 3, image 0 does not
        t = torch.full((N,), 500.0, dtype=torch.float64)
        with torch.no_grad():
            full, full_moved = model(x, t, **cond), model(moved, t, **cond)
            p = build_policy(policy, SKIP_ALL[policy])
            with p.session(model, 5):  # delta-dit: evaluation 1 caches the rear range, 2.. the front range
                outs = [model(x, t, **cond) for _ in range(3)] + [model(moved, t, **cond) for _ in range(2)]
        for out in outs[:3]:
            torch.testing.assert_close(out, full, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(outs[3][0], full_moved[0], rtol=1e-9, atol=1e-9)
        if policy in ("fbc", "teacache"):  # per row: the changed image is recomputed, the other reuses
            torch.testing.assert_close(outs[3][1], full_moved[1], rtol=1e-9, atol=1e-9)
            assert 0 < p.report()["units"][f"blocks.{len(model.blocks) - 1}"]["cached"] < 4
        else:  # the static policies reuse regardless: image 1 is off
            assert (outs[3][1] - full_moved[1]).abs().max() > 1e-4
        assert p.report()["full_evaluations"] < 5
    finally:
        model.float()


def test_uvit_backbones_declare_their_long_skips(backbones):
    # depth 5: in-blocks 0, 1 feed out-blocks 4, 3; a Delta-DiT front range of 4 blocks leaves block 4 outside
    for name in ("dis", "diffusion-rwkv"):
        assert long_skips(backbones[name][0]) == {3: 1, 4: 0}
    assert long_skips(backbones["dit"][0]) == {}


def test_an_unregistered_block_with_several_outputs_is_refused_in_one_line():
    """The block-level policies add up block states: a block of unknown structure that returns a tuple is refused
    with a ConfigError naming the fix (register its stream), not a shape error deep in the model."""
    import torch.nn as nn

    from ditk.errors import ConfigError

    class PairBlock(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(4, 4)

        def forward(self, x, r):
            return self.lin(x), r

    class PairModel(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList([PairBlock(), PairBlock()])

        def forward(self, x, t):
            r = x
            for block in self.blocks:
                x, r = block(x, r)
            return x + r

    model, x = PairModel(), torch.randn(2, 3, 4)
    for name in ("delta-dit", "fbc"):
        with pytest.raises(ConfigError, match="register_block") as info, torch.no_grad():
            with build_policy(name).session(model, 2):
                model(x, torch.zeros(2))
        assert "\n" not in str(info.value)
