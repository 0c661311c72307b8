"""TinyFusion's learnable N:M mask: the straight-through gate is exactly 0/1 in the forward pass and still
carries a gradient to the mask logits; a planted useless block (adaLN gates zeroed: the block is the identity)
is the block the search drops."""

import torch

from ditk.prune.layout import layout_for
from ditk.prune.learnable import MaskSearch, keep_masks, search_mask
from ditk.prune.surgery import build_from_section


def test_keep_masks_enumerate_every_choice():
    masks = keep_masks(4, 2)
    assert masks.shape == (6, 4) and set(masks.sum(1).tolist()) == {2.0}
    assert len({tuple(r) for r in masks.tolist()}) == 6


def test_straight_through_gate_is_exactly_binary_and_differentiable():
    search = MaskSearch(8, 2, 4)
    with torch.no_grad():
        search.logits.normal_(0, 0.05)
    gates = search.sample(16, tau=0.7, scale=100.0, generator=torch.Generator().manual_seed(0))
    assert gates.shape == (16, 8)
    assert set(gates.detach().unique().tolist()) <= {0.0, 1.0}  # exact values, not 0.9999 / 1e-8
    assert torch.equal(gates.detach().view(16, 2, 4).sum(-1), torch.full((16, 2), 2.0))  # N of every M kept
    (gates * torch.arange(8.0)).sum().backward()
    assert search.logits.grad is not None and search.logits.grad.abs().sum() > 0


def test_search_drops_a_planted_useless_block():
    section = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=4, num_heads=2, num_classes=10,
                   learn_sigma=False)
    torch.manual_seed(0)
    model = build_from_section("dit", section)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
        model.blocks[2].adaLN_modulation[-1].weight.zero_()  # planted: both residual gates 0 -> block 2 = identity
        model.blocks[2].adaLN_modulation[-1].bias.zero_()
    model.eval().requires_grad_(False)
    layout = layout_for("dit", section)
    x = torch.randn(16, 1, 8, 8, generator=g)
    t = torch.rand(16, generator=g) * 1000
    y = torch.randint(10, (16,), generator=g)
    with torch.no_grad():
        target = model(x, t, y)  # the unpruned model's prediction: dropping block 2 loses nothing

    def loss_fn(step):
        return ((model(x, t, y) - target) ** 2).mean()

    # a 20-step search: an EMA horizon of ~10 steps (TinyFusion's 0.999 suits its 10k-step epoch)
    kept, info = search_mask(model, layout, 3, 4, loss_fn, steps=20, lr=1e-3, lora_rank=4, lora_alpha=8.0, seed=0,
                             batch_of=lambda step: 16, ema_decay=0.9)
    assert kept == [0, 1, 3]
    assert info["confidence"][0] > 0.5
    # the LoRA was discarded: the model is untouched
    with torch.no_grad():
        assert torch.equal(model(x, t, y), target)


def test_decision_is_the_argmax_of_the_ema_of_the_logits():
    search = MaskSearch(4, 1, 2)  # 2 groups of 2 units, keep 1: options [1, 0] and [0, 1]
    with torch.no_grad():
        search.logits.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
        search.update_ema(0.5)  # ema = 0.5 * 0.02 + 0.5 * logits
        search.logits.copy_(torch.tensor([[0.0, 1.2], [0.0, 1.0]]))
        search.update_ema(0.5)
    ema = 0.5 * (0.5 * torch.full((2, 2), 0.02) + 0.5 * torch.tensor([[1.0, 0.0], [0.0, 1.0]])) \
        + 0.5 * torch.tensor([[0.0, 1.2], [0.0, 1.0]])
    torch.testing.assert_close(search.ema_logits, ema)
    assert search.decision() == [1, 3]  # ema group 0 = [0.255, 0.605], group 1 = [0.005, 0.755]
    torch.testing.assert_close(search.probabilities(10.0), torch.softmax(ema * 10.0, -1))
    with torch.no_grad():
        search.logits.copy_(torch.tensor([[3.0, 0.0], [0.0, 1.0]]))
    assert search.decision() == [1, 3]  # the EMA, not the last logits (which now prefer unit 0), decides
    search.update_ema(0.0)
    assert search.decision() == [0, 3]


def test_search_anneals_tau_and_scaling_and_decides_from_the_logit_ema(monkeypatch):
    section = dict(input_size=8, patch_size=2, in_channels=1, hidden_size=16, depth=2, num_heads=2, num_classes=10,
                   learn_sigma=False)
    torch.manual_seed(0)
    model = build_from_section("dit", section).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    x, t, y = torch.randn(4, 1, 8, 8, generator=g), torch.rand(4, generator=g) * 999, torch.randint(10, (4,), generator=g)
    seen, trajectory = [], []
    sample, update = MaskSearch.sample, MaskSearch.update_ema
    monkeypatch.setattr(MaskSearch, "sample", lambda self, b, tau, scale, generator:
                        seen.append((tau, scale)) or sample(self, b, tau, scale, generator))
    monkeypatch.setattr(MaskSearch, "update_ema", lambda self, decay:
                        trajectory.append(self.logits.detach().clone()) or update(self, decay))
    kept, info = search_mask(model, layout_for("dit", section), 1, 2, lambda step: model(x, t, y).pow(2).mean(),
                             steps=5, lr=1e-2, lora_rank=0, tau_start=4.0, tau_end=0.1, scale=100.0, scale_end=20.0,
                             ema_decay=0.6, seed=0, batch_of=lambda step: 4)
    assert [round(a, 6) for a, _ in seen] == [4.0, 3.025, 2.05, 1.075, 0.1]
    assert [round(b, 6) for _, b in seen] == [100.0, 80.0, 60.0, 40.0, 20.0]
    ema = torch.full((1, 2), 0.02)
    for logits in trajectory:  # by hand: started from the initial logits, one update per step
        ema = 0.6 * ema + 0.4 * logits
    torch.testing.assert_close(torch.tensor(info["mask_logits_ema"]), ema)
    assert kept == [int(ema[0].argmax())]
    torch.testing.assert_close(torch.tensor(info["mask_probabilities"]), torch.softmax(ema * 20.0, -1))
