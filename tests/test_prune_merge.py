"""DiT-MoE expert merging: the router stays a softmax + top-k over the remaining (merged) experts, merged weights
and router rows are the usage-weighted averages of their groups, and on a planted near-duplicate expert merging
lands closer to the source layer than dropping it."""

import torch

from ditk.moe_stats import moe_layers
from ditk.prune.experts import keep_experts, merge_experts, merge_groups, router_similarity
from ditk.prune.surgery import build_from_section

MOE = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=1, num_heads=2, num_classes=10,
           learn_sigma=False, num_experts=4, top_k=2, num_shared_experts=1)


def planted():
    """Expert 3 = expert 1 with a different down projection and a router row that is expert 1's plus a little
    noise: a near-duplicate that routes like expert 1 but computes something else."""
    torch.manual_seed(0)
    model = build_from_section("dit-moe", MOE).double().eval()
    layer = moe_layers(model)[0][1]
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
        for name in ("gate_proj", "up_proj"):
            getattr(layer.experts[3], name).weight.copy_(getattr(layer.experts[1], name).weight)
        layer.experts[3].down_proj.weight.copy_(layer.experts[1].down_proj.weight
                                                + torch.randn(32, 128, generator=g, dtype=torch.float64) * 0.3)
        layer.gate.weight[3] = layer.gate.weight[1] + torch.randn(32, generator=g, dtype=torch.float64) * 0.05
    return model, layer


class Calib:
    def __init__(self, x, t, y):
        self.data = (x, t, y)

    def loss(self, model, part):
        x, t, y = self.data
        return model(x[part], t[part], y[part]).pow(2).mean()


def test_merged_router_is_top_k_over_the_remaining_experts_and_merging_beats_dropping_on_a_planted_duplicate():
    model, layer = planted()
    name = moe_layers(model)[0][0]
    g = torch.Generator().manual_seed(2)
    calib = Calib(torch.randn(8, 1, 8, 8, generator=g, dtype=torch.float64), torch.rand(8, dtype=torch.float64) * 999,
                  torch.randint(10, (8,), generator=g))
    sim = router_similarity(model, calib, [slice(0, 4), slice(4, 8)])[0]
    # similarity = cosine of the router-logit columns over the tokens the layer saw: check one entry by hand
    seen = []
    handle = layer.gate.register_forward_hook(lambda m, a, o: seen.append(a[0]))
    with torch.no_grad():
        calib.loss(model, slice(0, 8))
    handle.remove()
    logits = torch.cat(seen) @ layer.gate.weight.t()
    torch.testing.assert_close(sim[3, 1], torch.nn.functional.cosine_similarity(logits[:, 3], logits[:, 1], dim=0))

    usage = [[0.3, 0.3, 0.3, 0.1]]
    kept = [[0, 1, 2]]
    groups = [merge_groups(kept[0], sim)]
    assert groups == [[[0], [1, 3], [2]]]  # the near-duplicate joins the expert it routes like
    small_cfg = {**MOE, "num_experts": 3}
    merged = build_from_section("dit-moe", small_cfg).double().eval()
    merged.load_state_dict(merge_experts(model.state_dict(), groups, usage, [name]), strict=True)
    dropped = build_from_section("dit-moe", small_cfg).double().eval()
    dropped.load_state_dict(keep_experts(model.state_dict(), kept, [name]), strict=True)
    m_layer = moe_layers(merged)[0][1]

    # merged weights and router rows: usage-weighted averages (0.3 : 0.1) of the group, the others unchanged
    w = layer.gate.weight
    torch.testing.assert_close(m_layer.gate.weight, torch.stack([w[0], 0.75 * w[1] + 0.25 * w[3], w[2]]))
    torch.testing.assert_close(m_layer.experts[1].down_proj.weight,
                               0.75 * layer.experts[1].down_proj.weight + 0.25 * layer.experts[3].down_proj.weight)
    torch.testing.assert_close(m_layer.experts[2].up_proj.weight, layer.experts[2].up_proj.weight)

    tokens = torch.randn(400, 32, generator=g, dtype=torch.float64)
    with torch.no_grad():
        # router consistency: top-k (k = 2) of the softmax over the 3 remaining rows, weights = those probabilities
        experts, weights, probs = m_layer.gate(tokens)
        ref = torch.softmax(tokens @ m_layer.gate.weight.t(), -1)
        ref_w, ref_e = torch.topk(ref, 2, dim=-1)
        assert probs.shape == (400, 3) and torch.equal(experts, ref_e)
        torch.testing.assert_close(weights, ref_w)
        # closer to the source layer than dropping expert 3
        source = layer(tokens)
        err_merge = (m_layer(tokens) - source).pow(2).mean()
        err_drop = (moe_layers(dropped)[0][1](tokens) - source).pow(2).mean()
    assert err_merge < 0.8 * err_drop, (float(err_merge), float(err_drop))
