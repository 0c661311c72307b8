"""The audio front end (log-mel, vocoders, files, pictures), the AudioLDM2 codec wrapper, the synthesiser's captions
against what its audio measurably is, the music data sets, and `ditk train` / `ditk sample --duration` on audio."""

import json
import math

import numpy as np
import pytest
import torch

from ditk.audio import analysis
from ditk.audio.mel import (LOG_FLOOR, GriffinLim, MelSpectrogram, denormalize, load_vocoder, normalize,
                            peak_limit, read_wav, save_spectrogram_png, spectrogram_rgb, write_wav)
from ditk.audio.synth import (MODES, PITCH_CLASSES, TIMBRES, VARIANTS, ClipSpec, caption, caption_vocabulary,
                              random_spec, synthesize)
from ditk.errors import ConfigError

SR = 16000


def tone(freq, seconds=1.0, amp=0.5, sr=SR):
    return (amp * np.sin(2 * np.pi * freq * np.arange(int(seconds * sr)) / sr)).astype(np.float32)


@pytest.fixture(scope="module")
def front():
    return MelSpectrogram()  # the paper's settings


def test_log_mel_matches_librosa_and_audioldm_conventions(front):
    """librosa's numpy STFT (centred, reflect, periodic Hann, magnitude) + Slaney mel is an independent reference for
    the torch STFT path; the log floor is AudioLDM's 1e-5; frames = samples // hop + 1 (1025 for 10.24 s)."""
    import librosa

    y = np.random.default_rng(0).normal(0, 0.1, SR).astype(np.float32) + tone(440, 1.0, 0.3)
    ref = librosa.feature.melspectrogram(y=y, sr=SR, n_fft=1024, hop_length=160, win_length=1024, window="hann",
                                         center=True, pad_mode="reflect", power=1.0, n_mels=64, fmin=0, fmax=8000)
    ours = front.mel(y).numpy()
    assert ours.shape == ref.shape == (64, SR // 160 + 1)
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-6)
    log = front.log_mel(np.zeros(SR, np.float32))
    assert torch.all(log == math.log(1e-5)) and front.num_frames(163840) == 1025


def test_mel_filters_are_slaney_as_an_independent_implementation_computes_them(front):
    from transformers.audio_utils import mel_filter_bank

    ref = mel_filter_bank(num_frequency_bins=513, num_mel_filters=64, min_frequency=0.0, max_frequency=8000.0,
                          sampling_rate=SR, norm="slaney", mel_scale="slaney")
    np.testing.assert_allclose(front.filters.numpy(), ref.T, rtol=1e-4, atol=1e-7)


def test_a_pure_tone_has_the_closed_form_stft_peak(front):
    """A sine of amplitude A at a bin-centre frequency: |STFT| peaks at that bin with A * sum(window) / 2 = A n_fft / 4;
    the loudest mel band is the one whose triangle peaks nearest to it."""
    import librosa

    k = 64
    f = k * SR / 1024  # 1000 Hz, the centre of bin 64
    mag = front.magnitude(tone(f, 1.0, 0.5))[:, 20:-20]
    assert int(mag.mean(1).argmax()) == k
    np.testing.assert_allclose(mag[k].numpy(), 0.5 * 1024 / 4, rtol=1e-3)
    centres = librosa.mel_frequencies(n_mels=66, fmin=0, fmax=8000)[1:-1]
    assert int(front.mel(tone(f))[:, 20:-20].mean(1).argmax()) == int(np.abs(centres - f).argmin())


def test_normalisation_maps_the_floor_to_minus_one_and_inverts(front):
    log = front.log_mel(synthesize(random_spec(np.random.default_rng(3)), 1.0))
    x = normalize(log)
    assert x.min() == -1 and -1 <= x.max() <= 1
    torch.testing.assert_close(denormalize(x), log, rtol=0, atol=1e-5)
    assert denormalize(torch.tensor(-3.0)) == LOG_FLOOR  # below the floor is silence, not less


def test_wav_round_trip_and_resampling(tmp_path):
    y = tone(440, 0.5, 0.4)
    write_wav(tmp_path / "a.wav", y, SR)
    back, sr = read_wav(tmp_path / "a.wav")
    assert sr == SR and back.shape == y.shape
    assert np.abs(back - y).max() <= 1 / 32767  # 16-bit PCM quantisation
    down, sr8 = read_wav(tmp_path / "a.wav", sample_rate=8000)
    spec = np.abs(np.fft.rfft(down))
    assert sr8 == 8000 and len(down) == 4000 and abs(np.argmax(spec) * 8000 / len(down) - 440) < 3
    with pytest.raises(ConfigError, match="cannot read"):
        read_wav(tmp_path / "missing.wav")
    loud = torch.tensor([0.5, -2.0, 1.0])
    assert torch.allclose(peak_limit(loud), loud * 0.95 / 2) and torch.equal(peak_limit(loud / 4), loud / 4)


def test_griffin_lim_inverts_a_melody_keeping_what_the_caption_says():
    front = MelSpectrogram(hop_length=512)
    spec = ClipSpec("melody", "falling", "fast", 190.0, 2, "minor", "harp", 88, (1, 1, 2, 1, 1, 1, 2, 1))
    y = synthesize(spec, 4.0)
    vocoder = load_vocoder("griffin-lim", front, griffin_lim_iters=32)
    wave = vocoder(front.log_mel(y))
    assert isinstance(vocoder, GriffinLim) and wave.shape == (front.num_samples(front.num_frames(len(y))),)
    assert torch.equal(wave, vocoder(front.log_mel(y)))  # seeded: deterministic
    m, m2 = front.mel(y), front.mel(wave.numpy())
    assert float((m - m2).norm() / m.norm()) < 0.1  # mel spectral convergence
    again = front.log_mel(wave.numpy())
    assert analysis.direction(again, front) == "falling" and analysis.tempo(again, front) == "fast"


@pytest.fixture(scope="module")
def audioldm2_folder(tmp_path_factory):
    """A tiny AudioLDM2-shaped folder: random diffusers AutoencoderKL (1 -> 8 channels, 4x down) and a random
    SpeechT5HifiGan with hop 160, saved the way the real pipeline stores them (vae/, vocoder/)."""
    from diffusers import AutoencoderKL
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    root = tmp_path_factory.mktemp("audioldm2")
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=1, out_channels=1, latent_channels=8, block_out_channels=(8, 8, 8),
                        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
                        layers_per_block=1, norm_num_groups=4, scaling_factor=0.6)
    vae.save_pretrained(root / "vae")
    voc = SpeechT5HifiGan(SpeechT5HifiGanConfig(model_in_dim=64, sampling_rate=SR, upsample_initial_channel=64,
                                               upsample_rates=[5, 4, 2, 2, 2], upsample_kernel_sizes=[15, 8, 4, 4, 4],
                                               resblock_kernel_sizes=[3], resblock_dilation_sizes=[[1]],
                                               normalize_before=False))
    voc.save_pretrained(root / "vocoder")
    return root


def test_hifigan_vocoder_loads_from_a_local_folder_and_reads_time_major(audioldm2_folder, front):
    from transformers import SpeechT5HifiGan

    vocoder = load_vocoder(str(audioldm2_folder), front)  # finds vocoder/ inside the AudioLDM2 folder
    ref = SpeechT5HifiGan.from_pretrained(audioldm2_folder / "vocoder").eval()
    log_mel = front.log_mel(tone(660, 0.5))
    with torch.no_grad():
        expected = ref(log_mel.T[None])  # the model reads (batch, frames, n_mels)
    torch.testing.assert_close(vocoder(log_mel[None]), expected)
    assert vocoder(log_mel[None]).shape[-1] == log_mel.shape[-1] * 160
    with pytest.raises(ConfigError, match="16000 Hz / hop 512"):
        load_vocoder(str(audioldm2_folder), MelSpectrogram(hop_length=512))
    with pytest.raises(ConfigError, match="no HiFi-GAN"):
        load_vocoder(str(audioldm2_folder / "nothing"), front)


def test_audioldm2_vae_wrapper_transposes_and_scales_like_fluxmusic(audioldm2_folder, front):
    from diffusers import AutoencoderKL

    import ditk.audio.vae  # noqa: F401  (registers audioldm2-vae; configs get it through the audio data sets)
    from ditk.registry import AUTOENCODERS

    cfg = AUTOENCODERS.get("audioldm2-vae").config(path=str(audioldm2_folder), sample_posterior=False)
    ae = AUTOENCODERS.build("audioldm2-vae", cfg)
    ref = AutoencoderKL.from_pretrained(audioldm2_folder / "vae").eval()
    x = normalize(front.log_mel(np.stack([tone(500, 0.64), tone(900, 0.64)])))[:, None, :, :64]  # (2, 1, 64, 64)
    z = ae.encode(x)
    assert z.shape == (2, 8, 16, 16) and ae.downsample == 4 and ae.latent_channels(1) == 8
    with torch.no_grad():  # FluxMusic: vae.encode(log_mel (N, 1, T, F)) * scaling_factor
        expected = ref.encode(denormalize(x).transpose(-1, -2)).latent_dist.mode() * 0.6
        decoded = normalize(ref.decode(expected / 0.6).sample.transpose(-1, -2))
    torch.testing.assert_close(z, expected.transpose(-1, -2), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ae.decode(z), decoded, rtol=1e-5, atol=1e-5)
    assert ae.vocoder is not None and ae.vocoder.hop_length == 160
    with pytest.raises(ConfigError, match="AudioLDM2"):
        AUTOENCODERS.build("audioldm2-vae", AUTOENCODERS.get("audioldm2-vae").config(path=str(audioldm2_folder / "x")))


def test_spectrogram_picture_has_low_frequencies_at_the_bottom(tmp_path):
    from PIL import Image

    x = -torch.ones(8, 5)
    x[0] = 1.0  # energy in the lowest band only
    rgb = spectrogram_rgb(x, scale=2)
    assert rgb.shape == (16, 10, 3) and rgb[-1].sum() > rgb[0].sum()
    save_spectrogram_png(x, tmp_path / "s.png")
    assert Image.open(tmp_path / "s.png").size == (5, 8)


#################################################################################
#                  The synthesiser: captions against measurements               #
#################################################################################


def _notes(y, front):
    """(median f0 in MIDI, segment) of each note, segmenting at the detected onsets (first note from t = 0)."""
    import librosa

    times = [0.0, *analysis.onsets(front.log_mel(y), front), len(y) / SR]
    out = []
    for a, b in zip(times[:-1], times[1:]):
        seg = y[int((a + 0.03) * SR):int((b - 0.03) * SR)]
        if len(seg) < 2048:
            continue
        f0 = librosa.yin(seg, fmin=150, fmax=2500, sr=SR, frame_length=2048)
        out.append((float(librosa.hz_to_midi(np.median(f0))), seg))
    return out


def _harmonic_profile(seg, midi):
    f0 = 440 * 2 ** ((midi - 69) / 12)
    spec = np.abs(np.fft.rfft(seg * np.hanning(len(seg)), 8 * len(seg)))
    freqs = np.fft.rfftfreq(8 * len(seg), 1 / SR)
    amp = [spec[(freqs > k * f0 * 0.97) & (freqs < k * f0 * 1.03)].max(initial=0) ** 2 for k in range(1, 9)]
    third = len(seg) // 3
    decay = float(np.sum(seg[-third:] ** 2) / np.sum(seg[:third] ** 2))
    upper = sum(amp[1:]) / sum(amp)
    even_odd = (amp[1] + amp[3] + amp[5]) / (amp[2] + amp[4] + amp[6] + 1e-12)
    return upper, even_odd, decay


def _timbre(profile):
    upper, even_odd, decay = profile
    if upper < 0.05:
        return "flute"
    if decay < 0.4:
        return "harp"
    return "square-wave synth" if even_odd < 0.1 else "organ"


def test_captions_match_what_the_audio_measurably_is():
    """Direction and tempo for every clip (melodies and chords); for melodies also the key (first note = tonic, every
    note in the caption's scale) and the timbre (harmonic profile and decay), all estimated from the waveform."""
    front = MelSpectrogram()
    rng = np.random.default_rng(11)
    seen = set()
    for i in range(40):
        spec = random_spec(rng)
        y = synthesize(spec, 3.0, seed=i)
        log_mel = front.log_mel(y)
        text = caption(spec)
        assert analysis.direction(log_mel, front) in text and analysis.tempo(log_mel, front) in text, text
        if spec.kind != "melody":
            continue
        notes = _notes(y, front)
        pcs = [round(m) % 12 for m, _ in notes]
        tonic = PITCH_CLASSES[pcs[0]]
        assert f"in {tonic} {spec.mode}" in text, (text, pcs)
        assert all((pc - pcs[0]) % 12 in MODES[spec.mode] for pc in pcs), (text, pcs)
        assert all(abs(m - round(m)) < 0.3 for m, _ in notes)  # in tune
        got = {_timbre(_harmonic_profile(seg, m)) for m, seg in notes[:-1]}  # the last note may be cut short
        assert got == {spec.timbre}, (text, got)
        seen.add((spec.timbre, spec.direction, spec.tempo))
    assert {t for t, _, _ in seen} == set(TIMBRES)


def test_caption_vocabulary_and_synthesis_are_deterministic():
    vocab = caption_vocabulary()
    assert len(vocab) == len(set(vocab)) == 1000 and "a fast rising melody" in vocab
    spec = random_spec(np.random.default_rng(5))
    assert all(caption(spec, v) in vocab for v in VARIANTS)
    assert caption(ClipSpec("chords", "rising", "slow", 80, 9, "minor", "organ", 69), "full") == \
        "a slow rising chord progression on an organ in A minor"
    assert np.array_equal(synthesize(spec, 1.0, seed=2), synthesize(spec, 1.0, seed=2))
    assert abs(np.abs(synthesize(spec, 1.0)).max() - 0.5) < 1e-6  # AudioLDM's peak normalisation


def test_music_dataset_items_and_caption_cycle():
    from ditk.data.music import MusicConfig, SynthMusic
    from ditk.registry import DATASETS

    ds = DATASETS.build("music", MusicConfig(num_clips=10, frames=64, hop_length=512))
    assert isinstance(ds, SynthMusic) and ds.shape == (1, 64, 64) and ds.num_classes == 1000
    x, label = ds[3]
    assert x.shape == (1, 64, 64) and -1 <= float(x.min()) and float(x.max()) <= 1
    captions = [ds.class_names[ds[(3, e)][1]] for e in range(4)]  # (index, epoch) as the sampler passes it
    short = min(captions, key=len)  # "a fast rising melody"; the others add timbre and/or key
    assert len(set(captions)) == 4 and all(c.startswith(short) for c in captions)
    torch.testing.assert_close(x, normalize(ds.front.log_mel(ds.waveform(3)))[None])
    assert analysis.direction(denormalize(x[0]), ds.front) == ds.spec(3).direction


def test_audio_folder_dataset(tmp_path):
    from ditk.registry import DATASETS

    rows = []
    for i, f in enumerate((440.0, 880.0)):
        write_wav(tmp_path / f"c{i}.wav", tone(f, 1.5 if i else 0.2, 0.2), SR)
        rows.append(json.dumps({"file": f"c{i}.wav", "caption": f"tone {i}"}))
    (tmp_path / "captions.jsonl").write_text("\n".join(rows) + "\n")
    cfg = DATASETS.get("audio-folder").config(path=str(tmp_path), frames=64)
    ds = DATASETS.build("audio-folder", cfg)
    assert ds.class_names == ["tone 0", "tone 1"] and len(ds) == 2
    x, label = ds[1]
    assert x.shape == (1, 64, 64) and label == 1 and abs(float(x.max()) - float(normalize(torch.tensor(0.0)))) < 0.8
    short, _ = ds[0]  # 0.2 s, zero-padded to 0.64 s: silence (-1) at the end
    assert float(short[0, :, -5:].max()) == -1.0
    (tmp_path / "captions.jsonl").write_text('{"file": "nope.wav", "caption": "x"}\n')
    with pytest.raises(ConfigError, match="missing file"):
        DATASETS.build("audio-folder", cfg)


#################################################################################
#                                 Through the CLI                               #
#################################################################################


def test_runs_on_audio_data_sample_audio():
    from ditk.config import resolve
    from ditk.generate import modality

    assert modality(resolve("tones-fluxmusic")) == "audio" and modality(resolve("digits-dit")) == "image"
    assert modality(resolve("fluxmusic-small", allow_missing=("data", "autoencoder"))) == "audio"


@pytest.mark.slow
def test_train_then_sample_a_long_clip_writes_wav_and_png(tmp_path):
    """`ditk train tones-fluxmusic` (shrunk) then `ditk sample --prompt ... --duration 5`: a 5 s, 16 kHz WAV and its
    spectrogram picture per clip; a bad --duration is a one-line error (exit 2)."""
    from PIL import Image
    import soundfile as sf

    from ditk_testing import run_ditk

    env = {"OMP_NUM_THREADS": "1"}
    small = ["model.hidden_size=32", "model.num_heads=1", "model.depth_double=1", "model.depth_single=1",
             "data.num_clips=16", "train.global_batch_size=4", "train.max_steps=2", "train.log_every=1",
             "train.ckpt_every=2", "sample.num=2", "sample.steps=2", f"run.dir={tmp_path}"]
    run_ditk("train", "tones-fluxmusic", *small, "--no-progress", check=True, env=env)
    run = tmp_path / "tones-fluxmusic"
    assert (run / "samples" / "step-000002.png").is_file()
    proc = run_ditk("sample", run, "data.griffin_lim_iters=8", "--prompt", "a fast rising melody", "--duration", "5",
                    "--num", "1", "--steps", "2", "--no-progress", check=True, env=env)
    out = tmp_path / proc.stdout.strip()
    info = sf.info(str(out / "audio" / "000000.wav"))
    assert info.samplerate == SR and info.frames == 5 * SR
    report = json.loads((out / "report.json").read_text())
    assert report["windows"] == "multidiffusion" and report["vocoder"] == "griffin-lim"
    png = Image.open(out / "spectrograms" / "000000.png")
    assert png.size[1] == 64 * 2 and png.size[0] >= 156 * 2  # grid_scale 2: 64 bands x (5 s / 32 ms + 1) frames
    bad = run_ditk("sample", run, "--duration", "-1", env=env)
    assert bad.returncode == 2
