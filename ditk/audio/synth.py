"""A deterministic synthesiser of short clips of simple music, with captions that describe them.

Each clip is a melody (one note per beat, stepping through the scale) or a chord progression (a diatonic
triad per beat, its root stepping through the scale), with a chosen
  - direction: rising or falling (every step goes the same way),
  - tempo: slow (72-96 beats per minute) or fast (168-216),
  - key: tonic (12 pitch classes) and mode (major / natural minor); the first note (or chord root) is the tonic,
  - timbre: flute (near-sine), organ (sustained, rich in even and odd harmonics), harp (plucked: bright attack,
    fast decay) or square-wave synth (odd harmonics only, 1/k).
All of this is measurable in the audio (tests/test_audio.py estimates it back from the waveform), so a text-to-
music model trained on the clips can be checked for following its caption.

Captions come from a fixed vocabulary (`caption_vocabulary()`): the full description ("a fast rising melody on
a flute in D minor") and shorter ones that leave out the key, the timbre or both ("a fast rising melody"). A clip
is described by each of its four captions in turn, so a text encoder learns that every part of a caption counts.
Audio is mono float32, peak-normalised to 0.5 (AudioLDM's `normalize_wav`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

KINDS = ("melody", "chords")
DIRECTIONS = ("rising", "falling")
TEMPI = {"slow": (72.0, 96.0), "fast": (168.0, 216.0)}  # beats per minute; one note or chord per beat
TIMBRES = ("flute", "organ", "harp", "square-wave synth")
MODES = {"major": (0, 2, 4, 5, 7, 9, 11), "minor": (0, 2, 3, 5, 7, 8, 10)}  # natural minor
PITCH_CLASSES = ("C", "C sharp", "D", "E flat", "E", "F", "F sharp", "G", "A flat", "A", "B flat", "B")
# Caption variants: which optional parts a caption names. Every clip cycles through all four.
VARIANTS = ("full", "no key", "no timbre", "short")
# Melodies live where 64 mel bands up to 8 kHz resolve about a semitone (Slaney mel is linear below 1 kHz).
LOWEST_START, HIGHEST_START = 64, 76  # MIDI range of the tonic that starts a rising line (E4..E5)


@dataclass(frozen=True)
class ClipSpec:
    kind: str
    direction: str
    tempo: str
    bpm: float
    tonic: int  # pitch class 0..11 (0 = C)
    mode: str
    timbre: str
    start: int  # MIDI number of the first note (a tonic)
    steps: tuple = field(default=())  # scale-degree step sizes between consecutive notes (1 or 2)

    @property
    def key(self) -> str:
        return f"{PITCH_CLASSES[self.tonic]} {self.mode}"

    def degrees(self, n: int) -> list[int]:
        """Scale degrees (0 = the starting tonic) of the first n notes or chord roots."""
        sign = 1 if self.direction == "rising" else -1
        out, d = [0], 0
        for i in range(n - 1):
            d += sign * self.steps[i % len(self.steps)]
            out.append(d)
        return out

    def midi(self, degree: int) -> int:
        scale = MODES[self.mode]
        octave, idx = divmod(degree, 7)
        return self.start + 12 * octave + scale[idx]

    def notes(self, duration: float) -> list[tuple[float, float, list[int]]]:
        """(onset seconds, length seconds, MIDI pitches) of every note or chord that starts before `duration`."""
        beat = 60.0 / self.bpm
        n = int(math.ceil(duration / beat))
        out = []
        for i, d in enumerate(self.degrees(n)):
            pitches = [self.midi(d)] if self.kind == "melody" else [self.midi(d), self.midi(d + 2), self.midi(d + 4)]
            out.append((i * beat, beat, pitches))
        return out


def caption(spec: ClipSpec, variant: str = "full") -> str:
    what = "melody" if spec.kind == "melody" else "chord progression"
    text = f"a {spec.tempo} {spec.direction} {what}"
    if variant in ("full", "no key"):
        text += f" on {'an' if spec.timbre[0] in 'aeiou' else 'a'} {spec.timbre}"
    if variant in ("full", "no timbre"):
        text += f" in {spec.key}"
    return text


def caption_vocabulary() -> list[str]:
    """Every caption the synthesiser can give, in a fixed order (the data set's class names)."""
    out, seen = [], set()
    for variant in VARIANTS:
        for kind in KINDS:
            for tempo in TEMPI:
                for direction in DIRECTIONS:
                    for timbre in TIMBRES:
                        for mode in MODES:
                            for tonic in range(12):
                                spec = ClipSpec(kind, direction, tempo, 0.0, tonic, mode, timbre, 60)
                                text = caption(spec, variant)
                                if text not in seen:
                                    seen.add(text)
                                    out.append(text)
    return out


def random_spec(rng: np.random.Generator) -> ClipSpec:
    """Draw every attribute uniformly (tempo within its band; steps mostly 1 scale degree, sometimes 2)."""
    kind = KINDS[rng.integers(len(KINDS))]
    direction = DIRECTIONS[rng.integers(2)]
    tempo = ("slow", "fast")[rng.integers(2)]
    lo, hi = TEMPI[tempo]
    bpm = float(rng.uniform(lo, hi))
    tonic = int(rng.integers(12))
    mode = ("major", "minor")[rng.integers(2)]
    timbre = TIMBRES[rng.integers(len(TIMBRES))]
    # The lowest tonic in range; a falling line starts an octave higher so that it has room to fall.
    start = LOWEST_START + (tonic - LOWEST_START) % 12
    if direction == "falling":
        start += 12
    steps = tuple(int(s) for s in rng.choice([1, 1, 1, 2], size=8))
    return ClipSpec(kind, direction, tempo, bpm, tonic, mode, timbre, int(start), steps)


def _harmonics(timbre: str, f0: float, sample_rate: int) -> list[tuple[int, float]]:
    """(harmonic number, amplitude) below Nyquist."""
    if timbre == "flute":
        table = [(1, 1.0), (2, 0.08), (3, 0.03)]
    elif timbre == "organ":
        table = [(1, 1.0), (2, 0.7), (3, 0.5), (4, 0.45), (6, 0.3), (8, 0.25)]
    elif timbre == "harp":
        table = [(k, 1.0 / k**1.2) for k in range(1, 9)]
    elif timbre == "square-wave synth":
        table = [(k, 1.0 / k) for k in range(1, 40, 2)]
    else:
        raise ValueError(f"unknown timbre '{timbre}'")
    return [(k, a) for k, a in table if k * f0 < 0.45 * sample_rate]


def _note(timbre: str, f0: float, length: int, sample_rate: int, phase_seed: int) -> np.ndarray:
    t = np.arange(length) / sample_rate
    rng = np.random.default_rng(phase_seed)
    out = np.zeros(length)
    for k, a in _harmonics(timbre, f0, sample_rate):
        decay = np.exp(-t * (2.5 + 1.5 * k)) if timbre == "harp" else 1.0  # plucked: upper partials die first
        out += a * decay * np.sin(2 * math.pi * k * f0 * t + rng.uniform(0, 2 * math.pi))
    attack = {"flute": 0.04, "organ": 0.01, "harp": 0.003, "square-wave synth": 0.005}[timbre]
    release = min(0.03, 0.3 * length / sample_rate)
    env = np.minimum(1.0, t / attack) * np.clip((t[-1] - t) / release, 0.0, 1.0) if length > 1 else np.zeros(length)
    if timbre == "flute":
        env = env * (1.0 + 0.05 * np.sin(2 * math.pi * 5.0 * t))  # a little breathing tremolo
    return out * env


def midi_to_hz(m: float) -> float:
    return 440.0 * 2.0 ** ((m - 69) / 12.0)


def synthesize(spec: ClipSpec, duration: float, sample_rate: int = 16000, seed: int = 0) -> np.ndarray:
    """The clip's first `duration` seconds: mono float32, peak 0.5. Pure function of its arguments."""
    n = int(round(duration * sample_rate))
    out = np.zeros(n + sample_rate)  # room for the last note to finish before cutting
    gap = 0.06  # notes stop a little before the next beat, so that repeated timbres have audible onsets
    for i, (onset, length, pitches) in enumerate(spec.notes(duration)):
        start = int(round(onset * sample_rate))
        size = int(round((length * (1 - gap)) * sample_rate))
        for j, p in enumerate(pitches):
            out[start:start + size] += _note(spec.timbre, midi_to_hz(p), size, sample_rate, seed * 7919 + i * 31 + j)
    out = out[:n]
    peak = np.abs(out).max()
    return (0.5 * out / peak if peak > 0 else out).astype(np.float32)
