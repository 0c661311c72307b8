"""The injection spec: parsing, row/step alignment of injected features, editors end to end on a tiny model."""

import pytest
import torch

from ditk.edit import editors
from ditk.edit.features import FeatureCapture
from ditk.edit.grids import FlowGrid
from ditk.edit.spec import Injector, Layout, Rule, parse_rules
from ditk.errors import ConfigError
from ditk.hooks import attach
from ditk.objectives.ddpm import DDPM
from ditk.objectives.flow import RectifiedFlow
from ditk.sampling import sample
from test_edit_inversion import tiny_dit

ALL_POINTS = [f"blocks.{b}.attn.{t}_hook" for b in range(2) for t in ("q", "k", "v", "out")]


def test_parser_rejects_unknown_blocks_and_bad_rules():
    with pytest.raises(ConfigError, match="names block 7 but the model has 4 blocks"):
        parse_rules([{"blocks": [1, 7], "tensor": "v"}], depth=4)
    with pytest.raises(ConfigError, match="names block 4 but"):
        parse_rules({"rules": [{"blocks": "2:6", "tensor": "k"}]}, depth=4)
    with pytest.raises(ConfigError, match="tensor must be one of"):
        parse_rules([{"blocks": "all", "tensor": "w"}], depth=4)
    with pytest.raises(ConfigError, match="concat works on keys and values together"):
        parse_rules([{"blocks": "all", "tensor": "v", "op": "concat"}], depth=4)
    with pytest.raises(ConfigError, match="unknown key"):
        parse_rules([{"blocks": "all", "tensor": "v", "stepz": [0, 2]}], depth=4)
    rules = parse_rules([{"blocks": "1:3", "tensor": "v", "steps": [0, 3], "tokens": "all"},
                         {"blocks": "all", "tensor": "kv", "op": "concat", "source": "source"}], depth=4)
    assert rules[0].blocks == [1, 2] and rules[0].steps == (0, 3) and rules[1].blocks == [0, 1, 2, 3]


def _capture_sample(model, flow, z, cond):
    capture = FeatureCapture(model, ALL_POINTS)
    with capture.attached():
        x = sample(model, flow, z, cond, solver=FlowGrid(flow, 6, "rf-solver"), step_hooks=[capture])
    return x, capture.store


def test_replace_with_the_sources_own_features_reproduces_the_source_exactly():
    model, flow = tiny_dit(False), RectifiedFlow({})
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    cond = {"y": torch.tensor([3, 8])}
    source, store = _capture_sample(model, flow, z, cond)
    rules = [Rule(blocks=[0, 1], tensor=t, op="replace", source="inversion") for t in ("q", "k", "v", "out")]

    def replay(store_):
        inj = Injector(model, rules, Layout(2, ("target",)), 6, store=store_)
        with attach(model, inj.hook_fns()):
            return sample(model, flow, z, cond, solver=FlowGrid(flow, 6, "rf-solver"), step_hooks=[inj])

    assert torch.equal(replay(store), source)
    # features of another evaluation (keys shifted by one interval) do not reproduce it: the test can fail
    shifted = type(store)()
    for (key, point), value in store.data.items():
        k2 = ("interval", (key[1] + 1) % 6, key[2])
        shifted.data[(k2, point)] = value
    assert (replay(shifted) - source).abs().max() > 1e-5


def test_live_source_replace_maps_each_target_row_to_its_own_source_row():
    model, flow = tiny_dit(False), RectifiedFlow({})
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(1))
    cond = {"y": torch.tensor([3, 8])}
    rules = [Rule(blocks=[0, 1], tensor=t, op="replace", source="source") for t in ("k", "v")]
    inj = Injector(model, rules, Layout(2, ("source", "target")), 6)
    batch_cond = {"y": cond["y"].repeat(2)}
    with attach(model, inj.hook_fns()):
        out = sample(model, flow, z.repeat(2, 1, 1, 1), batch_cond, solver=FlowGrid(flow, 6, "euler"), step_hooks=[inj])
    assert torch.equal(out[2:], out[:2])  # a swapped row mapping would mix the two different images
    # with another target class the k/v injection changes the target but leaves the source branch alone
    inj = Injector(model, rules, Layout(2, ("source", "target")), 6)
    with attach(model, inj.hook_fns()):
        edited = sample(model, flow, z.repeat(2, 1, 1, 1), {"y": torch.tensor([3, 8, 5, 5])},
                        solver=FlowGrid(flow, 6, "euler"), step_hooks=[inj])
    assert torch.equal(edited[:2], out[:2]) and not torch.equal(edited[2:], out[2:])


@pytest.mark.parametrize("method,objective", [("naive", "ddpm"), ("tic", "ddpm"), ("masactrl", "ddpm"),
                                              ("rf-edit", "flow"), ("fireflow", "flow"), ("rf-inversion", "flow"),
                                              ("tic", "flow")])
def test_editors_run_and_count_their_evaluations(method, objective):
    model = tiny_dit(objective == "ddpm")
    obj = DDPM() if objective == "ddpm" else RectifiedFlow({})
    x0 = torch.rand(2, 1, 8, 8, generator=torch.Generator().manual_seed(2)) * 2 - 1
    src, tgt, null = {"y": torch.tensor([3, 1])}, {"y": torch.tensor([8, 7])}, {"y": torch.tensor([10, 10])}
    p = editors.plan(method, obj, depth=2, steps=6)
    res = editors.edit(model, obj, x0, src, tgt, null, p, 6)
    assert res["edited"].shape == x0.shape and torch.isfinite(res["edited"]).all()
    per_pass = {"rf-edit": 12, "fireflow": 7}.get(method, 6)
    assert res["nfe"] == res["inversion_nfe"] + per_pass * len(p.branches)
    if method == "tic":
        assert res["feature_cache_mb"] > 0 and 0 < res["mask_keep_fraction"] <= 1


def test_editor_errors_are_one_line():
    with pytest.raises(ConfigError, match="edits rectified-flow models"):
        editors.plan("rf-edit", DDPM(), depth=2, steps=6)
    with pytest.raises(ConfigError, match="does not apply to --method naive"):
        editors.plan("naive", DDPM(), depth=2, steps=6, knobs={"inject": 2})
    with pytest.raises(ConfigError, match="--method custom needs --spec"):
        editors.plan("custom", DDPM(), depth=2, steps=6)


def _two_branch(model, flow, rules, y_src, y_tgt, image_mask=None):
    z = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(3))
    inj = Injector(model, rules, Layout(2, ("source", "target")), 5, image_mask=image_mask)
    with attach(model, inj.hook_fns()):
        return sample(model, flow, z.repeat(2, 1, 1, 1), {"y": torch.tensor(y_src + y_tgt)},
                      solver=FlowGrid(flow, 5, "euler"), step_hooks=[inj])


def test_concat_oracles_duplicate_keys_and_fully_masked_source():
    """Attention over [K; K], [V; V] equals attention over K, V (every weight halves and renormalises), and a source
    whose tokens are all masked out (-inf) adds nothing: both give the plain (naive) result."""
    model, flow = tiny_dit(False), RectifiedFlow({})
    plain = _two_branch(model, flow, [], [3, 8], [5, 1])
    keep_all = [Rule(blocks=[0, 1], tensor="kv", op="concat", source="source", mask="image")]
    same = _two_branch(model, flow, keep_all, [3, 8], [3, 8], image_mask=torch.ones(2, 16))
    assert torch.allclose(same[2:], same[:2], atol=1e-5)  # target = its own source: the duplicated keys change nothing
    masked = _two_branch(model, flow, keep_all, [3, 8], [5, 1], image_mask=torch.zeros(2, 16))
    assert torch.allclose(masked, plain, atol=1e-5)
    half = torch.zeros(2, 16)
    half[:, :8] = 1
    edited = _two_branch(model, flow, keep_all, [3, 8], [5, 1], image_mask=half)
    assert torch.equal(edited[:2], plain[:2]) and (edited[2:] - plain[2:]).abs().max() > 1e-4


def test_token_mask_from_an_image_mask():
    from ditk.edit.spec import token_mask_from_image

    m = torch.zeros(1, 1, 8, 8)
    m[..., :4, :] = 1  # the top half is to be edited
    tokens = token_mask_from_image(m, 4)  # 4x4 patch grid, row-major
    assert tokens.tolist() == [[0.0] * 8 + [1.0] * 8]
