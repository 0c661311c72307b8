"""Measure musical properties of audio from its log-mel spectrogram: pitch direction and note rate (tempo).

Used to check that synthesised clips match their captions and that a text-to-music model follows its prompt.
  - pitch direction: per frame, the energy-weighted mean log2-frequency of the mel bands (a pitch centroid,
    which follows a melody and a chord progression alike, harmonics included since they move with the notes);
    the sign of its least-squares slope over the sounding frames;
  - note rate: onsets per second, onsets being peaks of the spectral flux (sum over bands of the positive change
    of log-mel), which fires on a new note even when the loudness does not change; tempo is "fast" above the
    rate between the synthesiser's slow and fast bands.
"""

from __future__ import annotations

import numpy as np
import torch

from .mel import LOG_FLOOR, MelSpectrogram
from .synth import TEMPI


def _mel_log2_freqs(front: MelSpectrogram) -> np.ndarray:
    import librosa

    c = front.cfg
    centres = librosa.mel_frequencies(n_mels=c.n_mels + 2, fmin=c.fmin, fmax=c.fmax)[1:-1]
    return np.log2(np.maximum(centres, 1.0))


def pitch_centroid(log_mel, front: MelSpectrogram, band=(150.0, 4000.0), quiet_db: float = 40.0):
    """(log2 Hz per frame, sounding mask) from a (n_mels, frames) natural-log mel spectrogram.

    Frames more than `quiet_db` below the loudest frame count as silence."""
    L = np.asarray(torch.as_tensor(log_mel).detach().cpu().double())
    log2f = _mel_log2_freqs(front)
    keep = (log2f >= np.log2(band[0])) & (log2f <= np.log2(band[1]))
    power = np.exp(2 * np.maximum(L[keep], LOG_FLOOR))  # magnitude squared: the strong partials dominate
    power = np.where(L[keep] <= LOG_FLOOR + 1e-6, 0.0, power)
    total = power.sum(0)
    loud = total.max() if total.size else 0.0
    sounding = total > loud * 10 ** (-quiet_db / 10) if loud > 0 else np.zeros_like(total, dtype=bool)
    centroid = (power * log2f[keep, None]).sum(0) / np.maximum(total, 1e-30)
    return centroid, sounding


def pitch_slope(log_mel, front: MelSpectrogram) -> float:
    """Octaves per second of the pitch centroid's least-squares line over the sounding frames (0 if silent)."""
    centroid, sounding = pitch_centroid(log_mel, front)
    t = np.arange(len(centroid)) * front.hop_length / front.sample_rate
    if sounding.sum() < 3:
        return 0.0
    return float(np.polyfit(t[sounding], centroid[sounding], 1)[0])


def direction(log_mel, front: MelSpectrogram) -> str:
    return "rising" if pitch_slope(log_mel, front) > 0 else "falling"


def onset_envelope(log_mel, front: MelSpectrogram, range_db: float = 50.0) -> np.ndarray:
    """Spectral flux per frame: sum over bands of max(0, L[t] - L[t-1]), with L limited to `range_db` below its
    maximum (leakage and noise far below the music would otherwise add up over the quiet bands). Frames whose
    centred window reaches past either end of the clip get 0 (a clip cut mid-note is not an onset)."""
    L = np.asarray(torch.as_tensor(log_mel).detach().cpu().double())
    L = np.maximum(L, max(L.max() - range_db / 20 * np.log(10), LOG_FLOOR))
    flux = np.concatenate([[0.0], np.maximum(0.0, np.diff(L, axis=1)).sum(0)])
    edge = int(np.ceil(front.n_fft / 2 / front.hop_length))
    flux[:edge] = 0.0
    flux[max(0, len(flux) - edge):] = 0.0
    return flux


def onsets(log_mel, front: MelSpectrogram, min_gap: float = 0.12, rel: float = 0.3, context: float = 1.0) -> np.ndarray:
    """Onset times (seconds): peaks of the flux, strongest first, at least `min_gap` apart (non-maximum
    suppression), each above `rel` x the largest flux within +-`context` seconds (a local reference, so that one
    loud event does not hide the onsets elsewhere in a long clip, and ripples inside a note do not count)."""
    env = onset_envelope(log_mel, front)
    hop = front.hop_length / front.sample_rate
    gap, reach = max(1, int(round(min_gap / hop))), max(1, int(round(context / hop)))
    local = np.array([env[max(0, i - reach):i + reach + 1].max() for i in range(len(env))]) if env.size else env
    picked: list[int] = []
    for i in np.argsort(-env, kind="stable"):
        if env[i] <= 0:
            break
        if env[i] > rel * local[i] and all(abs(int(i) - j) >= gap for j in picked):
            picked.append(int(i))
    return np.sort(np.array(picked, dtype=np.float64)) * hop


def notes_per_second(log_mel, front: MelSpectrogram) -> float:
    """Onsets per second of the time in which an onset can be detected (the clip less its edge frames): a count,
    which a single missed or doubled onset moves less than an inter-onset median does on short clips."""
    frames = np.asarray(torch.as_tensor(log_mel).shape)[-1]
    edge = int(np.ceil(front.n_fft / 2 / front.hop_length))
    usable = max(1, frames - 2 * edge) * front.hop_length / front.sample_rate
    return float(len(onsets(log_mel, front)) / usable)


# The rate between the slow band's top (96 BPM = 1.6 notes/s) and the fast band's bottom (168 BPM = 2.8/s).
TEMPO_THRESHOLD = float(np.sqrt(TEMPI["slow"][1] / 60 * TEMPI["fast"][0] / 60))


def tempo(log_mel, front: MelSpectrogram) -> str:
    return "fast" if notes_per_second(log_mel, front) > TEMPO_THRESHOLD else "slow"


def caption_following(pipe, clips: int, kind: str = "melody") -> dict:
    """The caption-following score of a text-to-music pipeline (tests/test_music_captions.py's measurement): for
    each prompt "a {slow|fast} {rising|falling} {kind}", `clips` clips (noise seeded by (sample.seed, i)) are
    sampled with the pipeline's settings, turned into WAV samples by its vocoder, and their pitch direction is
    estimated back from the audio. Returns {"agree": {"rising": n, "falling": n}, "total": 4 clips,
    "measured": {prompt: [direction, ...]}, "waves": {prompt: [waveform, ...]}}; chance agreement is 50 %."""
    from .generate import AudioOutput, sample_spectrograms

    io = AudioOutput(pipe)
    agree, measured, waves = {"rising": 0, "falling": 0}, {}, {}
    before = pipe.cfg.sample.prompt
    try:
        for tempo_name in ("slow", "fast"):
            for want in ("rising", "falling"):
                prompt = f"a {tempo_name} {want} {kind}"
                pipe.cfg.sample.prompt = prompt
                got, audio = [], []
                for spec in sample_spectrograms(pipe, list(range(clips))):
                    wave = io.waveform(spec)  # the WAV samples `ditk sample` writes
                    got.append(direction(io.front.log_mel(wave.numpy()), io.front))
                    audio.append(wave.numpy())
                measured[prompt], waves[prompt] = got, audio
                agree[want] += got.count(want)
    finally:
        pipe.cfg.sample.prompt = before
    return {"agree": agree, "total": 4 * clips, "measured": measured, "waves": waves}
