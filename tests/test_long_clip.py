"""Long clips (MusicCM / MultiDiffusion): windows that cover the canvas, the overlap average, and seams.

The seam oracle: data whose exact rectified-flow velocity is known in closed form (Gaussian rows with a smooth
time covariance), so a "model" that sees one window at a time is exactly right inside each window. Denoising
windows independently gives clips that jump at every window border; reconciling the overlapping windows at
every step must leave no jump at the seams larger than the changes inside the windows.
"""

import pytest
import torch

from ditk.audio.long import MultiDiffusion, canvas_width, seam_jumps, window_starts
from ditk.errors import ConfigError
from ditk.objectives.flow import RectifiedFlow
from ditk.sampling import sample

WINDOW, ELL = 16, 4.0


def test_windows_cover_the_canvas_and_end_flush():
    assert window_starts(16, 16, 8) == [0]
    assert window_starts(40, 16, 8) == [0, 8, 16, 24]
    assert window_starts(43, 16, 8) == [0, 8, 16, 24, 27]  # a last window flush with the end
    for total in range(16, 80):
        starts = window_starts(total, 16, 6)
        covered = torch.zeros(total)
        for s in starts:
            covered[s:s + 16] += 1
        assert covered.min() >= 1 and starts[-1] + 16 == total
    with pytest.raises(ConfigError):
        window_starts(40, 16, 0)
    assert canvas_width(100, 64, 8) == 104 and canvas_width(10, 64, 8) == 64


class Probe(torch.nn.Module):
    """A window model whose output is the window's mean over time plus the conditioning: averaging is checkable."""

    in_channels = out_channels = 1
    input_size, learn_sigma, num_classes = 4, False, 0

    def forward(self, x, t, y):
        return x.mean(-1, keepdim=True).expand_as(x) + y[:, None, None, None] + 0 * t[:, None, None, None]


def test_each_column_gets_the_average_of_the_windows_that_contain_it():
    x = torch.randn(2, 1, 4, 40)
    y = torch.tensor([1.0, -2.0])
    out = MultiDiffusion(Probe(), 16, 8, max_batch=3, weighting="uniform")(x, torch.zeros(2), y=y)
    starts = [0, 8, 16, 24]
    for j in (0, 7, 8, 20, 39):
        means = [x[..., s:s + 16].mean(-1) for s in starts if s <= j < s + 16]
        torch.testing.assert_close(out[..., j], sum(means) / len(means) + y[:, None, None])
    assert torch.equal(MultiDiffusion(Probe(), 40, 8)(x, torch.zeros(2), y=y), Probe()(x, torch.zeros(2), y))
    hann = MultiDiffusion(Probe(), 16, 8)(x, torch.zeros(2), y=y)  # weights sin^2(pi (j + 1/2) / 16)
    w = torch.sin(torch.pi * (torch.arange(16) + 0.5) / 16) ** 2
    j = 20  # in windows 8 (offset 12) and 16 (offset 4)
    expected = (w[12] * x[..., 8:24].mean(-1) + w[4] * x[..., 16:32].mean(-1)) / (w[12] + w[4])
    torch.testing.assert_close(hann[..., j], expected + y[:, None, None])


def smooth_covariance(n: int) -> torch.Tensor:
    i = torch.arange(n, dtype=torch.float64)
    return torch.exp(-((i[:, None] - i[None]) ** 2) / (2 * ELL**2)) + 1e-3 * torch.eye(n, dtype=torch.float64)


class GaussianFlow(torch.nn.Module):
    """The exact velocity E[eps - x0 | z_t] for x0 rows ~ N(0, S) over one window, z_t = (1 - t) x0 + t eps:
    v = (t I - (1 - t) S) ((1 - t)^2 S + t^2 I)^-1 z_t, applied along time."""

    in_channels = out_channels = 1
    input_size, learn_sigma, num_classes = 6, False, 0

    def __init__(self, width: int):
        super().__init__()
        self.S = smooth_covariance(width)

    def forward(self, x, t, **cond):
        out = []
        eye = torch.eye(self.S.shape[0], dtype=torch.float64)
        for xi, ti in zip(x, t.double() / 1000):
            m = (ti * eye - (1 - ti) * self.S) @ torch.linalg.inv((1 - ti) ** 2 * self.S + ti**2 * eye)
            out.append((xi.double() @ m.T).float())
        return torch.stack(out)


def generate(model, width, seed=0, n=16):
    noise = torch.randn(n, 1, 6, width, generator=torch.Generator().manual_seed(seed))
    return sample(model, RectifiedFlow(), noise, {}, solver="euler", steps=40)


def test_no_seam_is_a_bigger_jump_than_the_changes_inside_the_windows():
    """Column-to-column change (mean over 16 clips x 6 rows) at the 7 window seams of a 64-column canvas against the
    changes at the other 56 columns: equal within 5% (the estimate's noise; measured: mean 1.03x, max 1.00x).
    MultiDiffusion's plain average fails this (1.6x), and independent windows fail it by far."""
    width, stride = 64, WINDOW // 2
    starts = window_starts(width, WINDOW, stride)
    seams = sorted({s for s in starts if s > 0} | {s + WINDOW for s in starts if s + WINDOW < width})
    window_model = GaussianFlow(WINDOW)

    joint = generate(MultiDiffusion(window_model, WINDOW, stride), width)  # hann-weighted reconciliation
    at, inside = seam_jumps(joint, seams)
    assert at.max() <= 1.05 * inside.max() and at.mean() <= 1.05 * inside.mean(), (at, inside)

    # MultiDiffusion's plain average reconciles the windows too, but its fused update jumps where the set of
    # windows changes: measurable seams (the reason ditk weights windows by default).
    at_plain, inside_plain = seam_jumps(generate(MultiDiffusion(window_model, WINDOW, stride, weighting="uniform"), width),
                                        seams)
    assert at_plain.mean() > 1.3 * inside_plain.mean() and at_plain.max() > 1.3 * inside_plain.max()

    # The same windows denoised independently (no overlap, no reconciliation): every border is a jump.
    at_apart, inside_apart = seam_jumps(generate(MultiDiffusion(window_model, WINDOW, WINDOW), width), [16, 32, 48])
    assert at_apart.min() > 2 * inside_apart.max()

    # And the joint clip is still the data: its smoothness equals that of exact samples of the whole canvas.
    ref = generate(GaussianFlow(width), width, seed=1)
    assert abs(inside.mean() / seam_jumps(ref, [])[1].mean() - 1) < 0.05


def test_fluxmusic_on_a_long_canvas_matches_itself_on_one_window():
    """With the canvas exactly one window wide, MultiDiffusion is the plain model; wider canvases keep the shape and
    each column depends only on the windows around it."""
    from ditk.models.mmdit import FluxMusic

    torch.manual_seed(0)
    m = FluxMusic(input_size=8, frames=8, patch_size=4, in_channels=1, hidden_size=32, num_heads=1, depth_double=1,
                  depth_single=1, axes_dim=(8, 12, 12), context_dim=6, pooled_dim=5).eval()
    for p in m.parameters():
        torch.nn.init.normal_(p, std=0.2)
    cond = {"context": torch.randn(1, 3, 6), "pooled": torch.randn(1, 5)}
    x = torch.randn(1, 1, 8, 32)
    t = torch.tensor([500.0])
    md = MultiDiffusion(m, 8, 4)
    with torch.no_grad():
        out = md(x, t, **cond)
        torch.testing.assert_close(md(x[..., :8], t, **cond), m(x[..., :8], t, **cond))
        x2 = x.clone()
        x2[..., 24:] = 0  # columns 0..19 lie only in windows that end before column 24
        torch.testing.assert_close(md(x2, t, **cond)[..., :20], out[..., :20])
    assert out.shape == x.shape
