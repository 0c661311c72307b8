"""Does a trained tiny text-to-music model follow its caption? `ditk train tones-fluxmusic` (shrunk so that it
trains in well under a minute on one CPU thread), then clips sampled for "a {slow,fast} {rising,falling}
melody" are vocoded to WAV samples and their pitch direction is estimated back from the audio
(ditk.audio.analysis, the estimators that classify the synthesised training clips correctly). Chance is 50 %.

The full preset (2000 steps) agrees 97 % (benchmarks/bench_music_captions.py); this shrunk training was chosen
as about the smallest that still follows direction on every seed tried (docs/audio.md lists the measurements).
"""

import pytest

from ditk_testing import invoke_ditk

# One double + one single block of width 128; 400 steps of 32 clips drawn from 128 synthesised clips; 32 mel bands up
# to 4 kHz (the melodies' fundamentals lie at 330-1320 Hz), so 4 x 8 music tokens. About 45 s of training on one
# idle CPU thread. Everything else is the tones-fluxmusic preset (2 s windows, hop 32 ms, MiniLM text, CFG 4).
OVERRIDES = ["model.depth_double=1", "model.depth_single=1", "model.hidden_size=128", "model.num_heads=4",
             "model.input_size=32", "data.n_mels=32", "data.fmax=4000", "data.num_clips=128",
             "conditioner.max_length=16", "train.max_steps=400", "train.global_batch_size=32", "optim.warmup_steps=20",
             "train.log_every=50", "train.ckpt_every=400", "train.sample_every=0", "sample.num=1", "sample.steps=20",
             "data.griffin_lim_iters=16", "run.seed=0"]
CLIPS = 8  # per prompt: 4 prompts x 8 seeds = 32 prompt/seed pairs, 16 rising and 16 falling


@pytest.mark.slow
def test_trained_tiny_fluxmusic_follows_the_pitch_direction_of_its_prompt(tmp_path):
    from ditk.audio import analysis
    from ditk.audio.generate import AudioOutput
    from ditk.generate import load_pipeline
    from ditk.registry import DATASETS

    invoke_ditk("train", "tones-fluxmusic", *OVERRIDES, f"run.dir={tmp_path}", "--no-progress", check=True)
    pipe = load_pipeline(str(tmp_path / "tones-fluxmusic"), overrides=["sample.seed=0"], device="cpu")
    io = AudioOutput(pipe)
    # Control: the same measurement (log-mel -> Griffin-Lim -> WAV samples -> log-mel -> direction) is right on
    # held-out synthesised clips at this front end.
    data = {k: v for k, v in pipe.cfg.data.items() if k != "name"}
    held_out = DATASETS.build("music", DATASETS.get("music").config(**{**data, "seed": 7, "num_clips": 16}))
    for i in range(len(held_out)):
        wave = io.waveform(held_out[i][0][0])
        assert analysis.direction(io.front.log_mel(wave.numpy()), io.front) == held_out.spec(i).direction

    score = analysis.caption_following(pipe, CLIPS)  # clip i of each prompt: noise seeded by (0, i)
    agree, measured = score["agree"], score["measured"]
    total = agree["rising"] + agree["falling"]
    print(f"direction agrees with the prompt: {total}/32 (rising {agree['rising']}/16, falling {agree['falling']}/16)")
    # Chance would give 16 of 32 (P(>= 24 of 32 | chance) = 0.35 %); each direction on its own must be followed,
    # so a model that always rises (or falls) fails.
    assert total >= 24 and min(agree.values()) >= 10, (agree, measured)
