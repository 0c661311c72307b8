"""Hook points: read q/k/v and the attention output, replace them, clean up, enumerate in depth order."""

import pytest
import torch
import torch.nn.functional as F

from ditk import hooks
from ditk.errors import ConfigError
from ditk.models.dit import DiT


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = DiT(input_size=8, patch_size=2, in_channels=3, hidden_size=24, depth=11, num_heads=3, num_classes=4).eval()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():  # random weights: the adaLN-Zero init would make every block the identity
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return m


def inputs(n=2):
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 3, 8, 8, generator=g), torch.tensor([3.0, 700.0][:n]), torch.tensor([1, 4][:n])


def record(store, key):
    def fn(module, args, output):
        store[key] = (args[0].detach().clone(), output.detach().clone())

    return fn


def test_qkv_hooks_match_manual_recomputation(model):
    seen = {}
    points = ("attn", "attn.q_hook", "attn.k_hook", "attn.v_hook", "attn.out_hook")
    names = {f"blocks.2.{s}": record(seen, s) for s in points}
    with torch.no_grad(), hooks.attach(model, names) as hooked:
        model(*inputs())
    assert hooked == list(names)
    attn = model.blocks[2].attn
    attn_in = seen["attn"][0]  # the modulated, normalised tokens entering attention (N, T, D)
    n, t, d = attn_in.shape
    heads, hd = 3, d // 3
    w, b = attn.qkv.weight, attn.qkv.bias
    manual = {}
    for i, s in enumerate(("q", "k", "v")):
        proj = attn_in @ w[i * d : (i + 1) * d].T + b[i * d : (i + 1) * d]
        manual[s] = proj.reshape(n, t, heads, hd).transpose(1, 2)  # (N, heads, T, head_dim)
    for s in ("q", "k", "v"):
        assert seen[f"attn.{s}_hook"][1].shape == (n, heads, t, hd)
        torch.testing.assert_close(seen[f"attn.{s}_hook"][1], manual[s], rtol=1e-5, atol=1e-5)
    # The attention output before proj is softmax(q k^T / sqrt(hd)) v with heads merged back into D.
    weights = torch.softmax(manual["q"] @ manual["k"].transpose(-1, -2) / hd**0.5, dim=-1)
    merged = (weights @ manual["v"]).transpose(1, 2).reshape(n, t, d)
    torch.testing.assert_close(seen["attn.out_hook"][1], merged, rtol=1e-5, atol=1e-5)
    projected = F.linear(merged, attn.proj.weight, attn.proj.bias)
    torch.testing.assert_close(seen["attn"][1], projected, rtol=1e-5, atol=1e-5)


def test_replacing_v_with_zeros_zeroes_attention_output(model):
    seen = {}
    fns = {
        "blocks.5.attn.v_hook": lambda m, a, out: torch.zeros_like(out),
        "blocks.5.attn.out_hook": record(seen, "out"),
    }
    with torch.no_grad():
        plain = model(*inputs())
        with hooks.attach(model, fns):
            edited = model(*inputs())
    assert torch.equal(seen["out"][1], torch.zeros_like(seen["out"][1]))
    assert not torch.allclose(plain, edited)  # the replacement reached the output


def test_hooks_are_removed_after_the_context(model):
    with torch.no_grad():
        before = model(*inputs())
        with pytest.raises(RuntimeError, match="boom"):
            with hooks.attach(model, {"blocks.*.attn.v_hook": lambda m, a, out: out * 0}):
                assert all(len(model.blocks[i].attn.v_hook._forward_hooks) == 1 for i in range(11))
                raise RuntimeError("boom")  # removal must also happen when the body fails
        after = model(*inputs())
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    assert torch.equal(before, after)


def test_block_order_is_depth_order(model):
    assert hooks.blocks(model) == list(model.blocks)
    points = hooks.hook_points(model)
    expected = [f"blocks.{i}.attn.{s}_hook" for i in range(11) for s in ("q", "k", "v", "out")]
    assert points == expected  # blocks.10 after blocks.9: model order, not string order
    calls = []
    fns = {f"blocks.{i}": (lambda i: lambda m, a, out: calls.append(i))(i) for i in (10, 2, 9, 0)}
    with torch.no_grad(), hooks.attach(model, fns):
        model(*inputs(1))
    assert calls == [0, 2, 9, 10]


def test_unknown_name_is_a_config_error_and_attaches_nothing(model):
    with pytest.raises(ConfigError, match="blocks.99.attn.v_hook"):
        noop = lambda m, a, o: None  # noqa: E731
        with hooks.attach(model, {"blocks.0.attn.v_hook": noop, "blocks.99.attn.v_hook": noop}):
            pass
    assert all(len(m._forward_hooks) == 0 for m in model.modules())
    with pytest.raises(ConfigError, match="blocks"):
        hooks.blocks(torch.nn.Linear(2, 2))
