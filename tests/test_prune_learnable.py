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

    kept, info = search_mask(model, layout, 3, 4, loss_fn, steps=20, lr=1e-3, lora_rank=4, lora_alpha=8.0, seed=0,
                             batch_of=lambda step: 16)
    assert kept == [0, 1, 3]
    assert info["confidence"][0] > 0.5
    # the LoRA was discarded: the model is untouched
    with torch.no_grad():
        assert torch.equal(model(x, t, y), target)
