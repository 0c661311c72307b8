"""`ditk invert` / `ditk edit` on audio clips with a tiny tones-fluxmusic run (rectified flow, text, log-mel)."""

import json
import math

import numpy as np
import pytest
import soundfile as sf
import torch

from ditk_testing import invoke_ditk, random_audio_run

RATE, SAMPLES = 16000, 63 * 512  # tones-fluxmusic: 64 frames of hop 512 = one 2.016 s window


@pytest.fixture(scope="module")
def audio_run(tmp_path_factory):
    """A tiny tones-fluxmusic run (1 training step) whose weights are re-drawn at random (std 0.05): a freshly
    initialised FluxMusic is the identity (adaLN-Zero), and the velocity must depend on the input for inversion
    to have an error that shrinks with the steps."""
    return random_audio_run(tmp_path_factory.mktemp("audio-edit"), "model.depth_single=2", "sample.steps=2")


@pytest.fixture(scope="module")
def clips(tmp_path_factory):
    """Two synthesised training-style clips (float WAV, exact samples) and a few bad ones."""
    from ditk.data.music import MusicConfig, SynthMusic

    folder = tmp_path_factory.mktemp("clips")
    data = SynthMusic(MusicConfig(hop_length=512, frames=64, num_clips=2, seed=3))
    for i in range(2):
        sf.write(str(folder / f"clip{i}.wav"), data.waveform(i), RATE, subtype="FLOAT")
    bad = tmp_path_factory.mktemp("bad")
    wave = data.waveform(0)
    sf.write(str(bad / "long.wav"), np.concatenate([wave, wave]), RATE, subtype="FLOAT")
    sf.write(str(bad / "rate.wav"), wave[:20000], 22050, subtype="FLOAT")
    sf.write(str(bad / "silent.wav"), np.zeros(SAMPLES, np.float32), RATE, subtype="FLOAT")
    return folder, bad, data


def test_a_clip_enters_through_the_runs_own_front_end(audio_run, clips):
    """The spectrogram invert/edit compute from a clip file is the one the run's data set trains on."""
    from ditk.edit.audio import Clips, log_spectral_distance, normalize_wav
    from ditk.generate import load_pipeline

    folder, _, data = clips
    pipe = load_pipeline(str(audio_run), device="cpu")
    spec, waves = Clips(pipe).load([folder / "clip0.wav", folder / "clip1.wav"], resize=False)
    assert spec.shape == (2, 1, 64, 64) and len(waves[0]) == SAMPLES
    # the data set's own front end on the clip, after AudioLDM's normalize_wav (mean out, peak 0.5) ...
    want = torch.stack([data.front(normalize_wav(data.waveform(i).astype(np.float64)).astype(np.float32))[None]
                        for i in range(2)])
    torch.testing.assert_close(spec, want, atol=1e-5, rtol=0)
    # ... which the synthesised training clips nearly are (peak 0.5, mean ~1e-5; removing that mean moves only the
    # lowest, near-silent bands): 0.03 and 0.13 dB from the training spectrograms
    assert max(log_spectral_distance(spec, torch.stack([data.mel(0), data.mel(1)]))) < 0.5


def test_log_spectral_distance_by_hand():
    from ditk.audio.mel import normalize
    from ditk.edit.audio import log_spectral_distance

    g = torch.Generator().manual_seed(0)
    la = torch.rand(2, 1, 8, 5, generator=g, dtype=torch.float64) * 4 - 6  # natural-log mel, above the floor
    lb = la + torch.rand(2, 1, 8, 5, generator=g, dtype=torch.float64) - 0.5
    got = log_spectral_distance(normalize(la), normalize(lb))
    for i in range(2):  # mean over frames of sqrt(mean over bands of (20 log10(M_a / M_b))^2)
        a, b = np.exp(la[i, 0].numpy()), np.exp(lb[i, 0].numpy())
        want = np.mean(np.sqrt(np.mean((20 * np.log10(a / b)) ** 2, axis=0)))
        assert math.isclose(got[i], want, rel_tol=1e-9)
    assert log_spectral_distance(normalize(la), normalize(la)) == [0.0, 0.0]


def test_rf_solver_round_trip_on_audio_converges_with_the_steps(audio_run, clips):
    """Invert -> regenerate a clip's latent: the error shrinks as the steps grow (second order for RF-Solver,
    first for Euler), and RF-Solver is far below Euler at equal NFE."""
    from ditk.edit.audio import Clips
    from ditk.edit.inversion import invert, reconstruct
    from ditk.generate import load_pipeline

    folder, _, _ = clips
    pipe = load_pipeline(str(audio_run), device="cpu")
    spec, _ = Clips(pipe).load([folder / "clip0.wav"], resize=False)
    x0 = pipe.autoencoder.encode(spec)
    cond = pipe.conditioner.encode_prompts(["a slow rising melody"], pipe.device)
    err = {}
    for method in ("euler", "rf-solver"):
        for steps in (1, 2, 4, 8):
            inv = invert(pipe.model, pipe.objective, x0, cond, method, steps)
            rec, _ = reconstruct(pipe.model, pipe.objective, inv, cond, method, steps)
            err[method, steps] = float(((rec - x0) ** 2).mean())
    for method in ("euler", "rf-solver"):
        e = [err[method, s] for s in (1, 2, 4, 8)]
        assert all(b < a for a, b in zip(e, e[1:])), (method, e)
    assert err["rf-solver", 8] < 1e-6 * float((x0 ** 2).mean())  # to tolerance at 8 steps (16 NFE)
    assert err["rf-solver", 4] < err["euler", 8] / 100  # equal NFE (8 + 8): RF-Solver wins by > 100x


def test_invert_reconstruct_and_edit_write_wavs(audio_run, clips, tmp_path):
    folder, _, _ = clips
    out = tmp_path / "inv"
    proc = invoke_ditk("invert", audio_run, folder, "--prompt", "a slow rising melody", "--method", "rf-solver",
                       "--steps", "8", "--reconstruct", "--out", out, "--no-progress", "data.griffin_lim_iters=4")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(out) and "log-spectral distance" in proc.stderr
    report = json.loads((out / "report.json").read_text())
    assert report["front_end"]["sample_rate"] == RATE and report["vocoder"] == "griffin-lim"
    for row in report["images"]:
        assert row["latent_mse"] < 1e-6 and row["lsd_db"] < 0.1 and row["samples"] == SAMPLES
        # the regenerated WAV is as close to the source as vocoding the source's own spectrogram
        assert abs(row["wav_lsd_db"] - row["vocoder_bound_lsd_db"]) < 0.5
        info = sf.info(str(out / row["reconstruction"]))
        assert info.samplerate == RATE and info.frames == SAMPLES
    assert (out / "clip0.safetensors").is_file() and (out / "lineage.json").is_file()

    for method in ("rf-edit", "fireflow", "rf-inversion", "naive"):
        edit_out = tmp_path / f"edit-{method}"
        proc = invoke_ditk("edit", audio_run, folder / "clip0.wav", "--source-prompt", "a slow rising melody",
                           "--prompt", "a slow falling melody", "--method", method, "--steps", "4", "--out", edit_out,
                           "data.griffin_lim_iters=4")
        assert proc.returncode == 0, (method, proc.stderr)
        info = sf.info(str(edit_out / "audio" / "000000.wav"))
        assert info.samplerate == RATE and info.frames == SAMPLES
        report = json.loads((edit_out / "report.json").read_text())
        assert report["target_condition"] == "prompt: 'a slow falling melody'"
        assert report["clips"][0]["lsd_to_source_db"] >= 0 and report["clips"][0]["source_direction"] == "rising"
        assert np.load(edit_out / "spectrograms.npy").shape == (1, 64, 64)
    # the artefacts of the inversion edit without a second inversion
    proc = invoke_ditk("edit", audio_run, out / "clip0.safetensors", "--prompt", "a slow falling melody", "--method",
                       "naive", "--inversion", "rf-solver", "--steps", "8", "--out", tmp_path / "from-artefact",
                       "data.griffin_lim_iters=4")
    assert proc.returncode == 0 and "reusing the inversion" in proc.stderr, proc.stderr


def test_bad_clips_are_one_line_errors(audio_run, clips, tmp_path):
    folder, bad, _ = clips
    cases = [
        (["invert", audio_run, bad / "long.wav"], "pass --resize to keep its first window"),
        (["invert", audio_run, bad / "rate.wav"], "22050 Hz but the model takes 16000 Hz audio: pass --resize"),
        (["invert", audio_run, bad / "silent.wav"], "is silent"),
        (["edit", audio_run, bad / "long.wav", "--prompt", "a fast melody"], "pass --resize"),
        (["edit", audio_run, folder / "clip0.wav", "--prompt", "a fast melody", "--method", "tic"],
         "text-padding mask"),
        (["edit", audio_run, folder / "clip0.wav", "--prompt", "a fast melody", "--mask", bad / "long.wav"],
         "audio models take none"),
        (["edit", audio_run, folder / "clip0.wav", "--class-labels", "5000"], "5000"),  # captions are 0..999
    ]
    for args, needle in cases:
        proc = invoke_ditk(*args, "--out", tmp_path / "never")
        assert proc.returncode == 2, (args, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert lines[-1].startswith("error: ") and needle in lines[-1], (args, proc.stderr)
        assert "Traceback" not in proc.stderr and not (tmp_path / "never").exists()
    # --resize resamples and keeps the first window
    out = tmp_path / "resized"
    for clip in ("long.wav", "rate.wav"):
        proc = invoke_ditk("invert", audio_run, bad / clip, "--resize", "--steps", "2", "--out", out, "--no-progress")
        assert proc.returncode == 0, proc.stderr


def test_bare_text_model_weights_with_a_preset(audio_run, clips, tmp_path):
    """The paper-scale route (`ditk invert musicflow_s.pt --preset fluxmusic-small ...`): a text model's weights
    file has no run, hence no class names; prompts work and class labels are a one-line error."""
    folder, _, _ = clips
    weights = audio_run / "checkpoints" / "step-000001" / "ema.safetensors"
    arch = ["model.hidden_size=32", "model.num_heads=1", "model.depth_double=1", "model.depth_single=2"]
    proc = invoke_ditk("invert", weights, folder / "clip0.wav", "--preset", "tones-fluxmusic", *arch, "--prompt",
                       "a slow rising melody", "--steps", "2", "--out", tmp_path / "inv", "--no-progress")
    assert proc.returncode == 0, proc.stderr
    proc = invoke_ditk("edit", weights, folder / "clip0.wav", "--preset", "tones-fluxmusic", *arch, "--class-labels", "3",
                       "--out", tmp_path / "never")
    assert proc.returncode == 2 and "no class names: give a prompt" in proc.stderr.strip().splitlines()[-1], proc.stderr


def test_a_latent_audio_model_goes_through_its_mel_vae(clips, tmp_path):
    """FluxMusic's paper layout, from bare weights + --preset as the paper-scale command lines: log-mel ->
    AudioLDM2-shaped VAE (random, tiny; 1 -> 8 channels, 4x smaller) -> the model. --reconstruct reports the VAE
    round trip as the bound (an exact inversion reaches it), and edits decode through the VAE to WAVs of the clip's
    length."""
    from diffusers import AutoencoderKL
    from safetensors.torch import save_file

    from ditk.build import build_model
    from ditk.config import resolve

    torch.manual_seed(0)
    AutoencoderKL(in_channels=1, out_channels=1, latent_channels=8, block_out_channels=(8, 8, 8),
                  down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                  layers_per_block=1, norm_num_groups=4, scaling_factor=0.6).save_pretrained(tmp_path / "vae" / "vae")
    arch = ["model.hidden_size=32", "model.num_heads=1", "model.depth_double=1", "model.depth_single=1",
            "model.input_size=16", "model.frames=16", "model.patch_size=2", "model.in_channels=8",
            "autoencoder.name=audioldm2-vae", f"autoencoder.path={tmp_path / 'vae'}", "data.griffin_lim_iters=2"]
    model = build_model(resolve("tones-fluxmusic", arch))  # freshly initialised: v = 0 (adaLN-Zero)
    save_file(model.state_dict(), str(tmp_path / "weights.safetensors"))
    folder, _, _ = clips
    out = tmp_path / "inv"
    proc = invoke_ditk("invert", tmp_path / "weights.safetensors", folder / "clip0.wav", "--preset", "tones-fluxmusic",
                       *arch, "--steps", "4", "--reconstruct", "--out", out, "--no-progress")
    assert proc.returncode == 0, proc.stderr
    row = json.loads((out / "report.json").read_text())["images"][0]
    assert row["latent_mse"] < 1e-8  # v = 0: the round trip is exact...
    assert math.isclose(row["lsd_db"], row["vae_bound_lsd_db"], rel_tol=1e-4)  # ...so only the VAE's error is left
    assert sf.info(str(out / "reconstructions" / "clip0.wav")).frames == SAMPLES
    proc = invoke_ditk("edit", tmp_path / "weights.safetensors", folder / "clip0.wav", "--preset", "tones-fluxmusic",
                       *arch, "--prompt", "a fast falling melody", "--method", "rf-edit", "--steps", "2", "--out",
                       tmp_path / "edit")
    assert proc.returncode == 0, proc.stderr
    assert sf.info(str(tmp_path / "edit" / "audio" / "000000.wav")).frames == SAMPLES
