"""Feature caching for audio sampling: FluxMusic clips of one window and long clips (MultiDiffusion windows).

Oracles: no cache (bit-identical samples and WAVs when nothing is skipped); the FORA schedule (ceil(S/N) full
passes); for a long canvas, a window's cache serving only that window: the clip is the same whether the windows
run in one call of the model or in several groups (every group keeps its own cache state), and the report counts
one trajectory per window, sample and CFG branch.
"""

import json

import pytest
import torch

from ditk.audio.long import MultiDiffusion, window_starts
from ditk.cache import build_policy
from ditk.objectives.flow import FlowConfig, RectifiedFlow
from ditk.sampling import sample
from ditk_testing import invoke_ditk, random_audio_run


def tiny_fluxmusic():
    from ditk.models.mmdit import FluxMusic

    torch.manual_seed(0)
    m = FluxMusic(input_size=4, frames=8, patch_size=2, in_channels=1, hidden_size=32, num_heads=2, depth_double=1,
                  depth_single=2, axes_dim=(4, 6, 6), context_dim=6, pooled_dim=5).eval().requires_grad_(False)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in m.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return m


def long_clip(model, policy, max_batch, steps=5, n=2, width=20):
    """A canvas of 20 columns = windows of 8 at 0, 4, 8, 12 (stride 4), sampled with CFG and Euler steps."""
    g = torch.Generator().manual_seed(3)
    cond = {"context": torch.randn(n, 3, 6, generator=g), "pooled": torch.randn(n, 5, generator=g)}
    uncond = {"context": torch.zeros(n, 3, 6), "pooled": torch.zeros(n, 5)}
    noise = torch.randn(n, 1, 4, width, generator=g)
    md = MultiDiffusion(model, 8, 4, max_batch=max_batch)
    return sample(md, RectifiedFlow(FlowConfig()), noise, cond, uncond, solver="euler", steps=steps, cfg_scale=3.0,
                  cache=policy)


@pytest.mark.parametrize("name,no_skip,skipping", [
    ("fora", {"interval": 1}, {"interval": 2}),
    ("taylorseer", {"interval": 1}, {"interval": 3, "max_order": 1}),
    ("delta-dit", {"interval": 1}, {"interval": 2, "blocks": 2}),
    ("fbc", {"threshold": 0.0}, {"threshold": 1.5}),
    ("teacache", {"threshold": 0.0}, {"threshold": 0.3}),
])
def test_long_clip_cache_is_per_window_and_branch(name, no_skip, skipping):
    model = tiny_fluxmusic()
    windows = len(window_starts(20, 8, 4))
    reference = long_clip(model, None, max_batch=5)  # 16 rows in groups of 5, 5, 5, 1
    policy = build_policy(name, no_skip)
    assert torch.equal(long_clip(model, policy, max_batch=5), reference)
    assert policy.report()["trajectories"] == windows * 2 * 2  # windows x samples x (cond, uncond)
    # Skipping: the same clip whether all windows run in one call or in groups of 5 rows (each group its own
    # state); a cache shared between groups would hand one group's features to another (or fail on the shapes).
    one, grouped = build_policy(name, skipping), build_policy(name, skipping)
    a, b = long_clip(model, one, max_batch=64), long_clip(model, grouped, max_batch=5)
    torch.testing.assert_close(b, a, rtol=1e-5, atol=1e-5)
    assert one.report()["units"] == grouped.report()["units"]
    assert one.report()["full_evaluations"] < 5 and not torch.equal(a, reference)
    if name == "fora":
        assert one.report()["full_evaluations"] == 3  # ceil(5 / 2)


@pytest.fixture(scope="module")
def audio_run(tmp_path_factory):
    """A tiny tones-fluxmusic run (1 training step) whose weights are then re-drawn at random, so that every
    block matters (a freshly initialised FluxMusic is the identity: adaLN-Zero)."""
    return random_audio_run(tmp_path_factory.mktemp("audio-runs"), "model.depth_single=2", "sample.steps=2")


def test_sample_cache_on_an_audio_run(audio_run, tmp_path):
    args = ["--prompt", "a fast rising melody", "--duration", "3", "--num", "2", "--steps", "4", "--no-progress",
            "data.griffin_lim_iters=2"]

    def sample_into(name, *extra):
        proc = invoke_ditk("sample", audio_run, *args, *extra, "--out", tmp_path / name, check=True)
        assert proc.stdout.strip() == str(tmp_path / name)
        return json.loads((tmp_path / name / "report.json").read_text())

    plain = sample_into("none")
    no_skip = sample_into("fora1", "--cache", "fora", "--cache-opt", "interval=1")
    fora = sample_into("fora2", "--cache", "fora", "--cache-opt", "interval=2")
    assert plain["windows"] == "multidiffusion" and plain["cache"]["policy"] == "none"
    for i in range(2):  # nothing skipped: the same WAV files, byte for byte
        name = f"audio/{i:06d}.wav"
        assert (tmp_path / "fora1" / name).read_bytes() == (tmp_path / "none" / name).read_bytes()
    assert (tmp_path / "fora2" / "audio/000000.wav").read_bytes() != (tmp_path / "none" / "audio/000000.wav").read_bytes()
    for report in (plain, no_skip, fora):
        assert report["seconds_per_clip"] > 0 and report["clips_per_sec"] > 0 and report["peak_rss_mb"] > 0
        assert report["cache"]["model_evaluations"] == 4 and report["compile"] == {"requested": False}
    assert no_skip["cache"]["full_evaluations"] == 4
    assert fora["cache"]["full_evaluations"] == 2  # ceil(4 / 2)
    computed = lambda r: sum(u["computed"] for u in r["cache"]["units"].values())  # noqa: E731
    assert computed(fora) == computed(no_skip) / 2
    windows = plain["cache"]["trajectories"] // (2 * 2)  # 2 clips x (cond, uncond)
    assert windows > 1 and fora["cache"]["trajectories"] == plain["cache"]["trajectories"]
