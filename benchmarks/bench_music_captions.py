"""Does a trained text-to-music run follow its prompt? Pitch direction and tempo measured from generated audio.

For each prompt "a {slow|fast} {rising|falling} melody", sample --num clips of one training window, turn them into
sound with the run's vocoder (Griffin-Lim for tones-fluxmusic), re-analyse the WAV samples with the same front
end and estimate (ditk.audio.analysis) the pitch direction (sign of the pitch-centroid slope) and the tempo class
(onset rate above or below the gap between the slow and fast bands). Chance agreement is 50% for each. Then one
long clip ("a fast rising melody", --long-duration seconds, MultiDiffusion) is checked for seams: column-to-column
spectrogram change at the window seams against the change everywhere else.

    ditk train tones-fluxmusic                      # about an hour on 2 busy CPU cores
    python benchmarks/bench_music_captions.py runs/tones-fluxmusic --num 16

Prints one JSON object (stdout). Timing/agreement are measurements, never part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import torch


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", nargs="?", default="runs/tones-fluxmusic")
    parser.add_argument("--num", type=int, default=16, help="clips per prompt")
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--cfg-scale", type=float, default=None)
    parser.add_argument("--kind", default="melody", choices=["melody", "chord progression"])
    parser.add_argument("--long-duration", type=float, default=20.0)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args(argv)

    from ditk.audio import analysis
    from ditk.audio.generate import AudioOutput, sample_spectrograms, window_of
    from ditk.audio.long import seam_jumps, window_starts
    from ditk.generate import load_pipeline

    overrides = [f"sample.seed={args.seed}", f"sample.num={args.num}"]
    overrides += [f"sample.steps={args.steps}"] if args.steps else []
    overrides += [f"sample.cfg_scale={args.cfg_scale}"] if args.cfg_scale is not None else []
    pipe = load_pipeline(args.run, overrides=overrides, device="cpu")
    io = AudioOutput(pipe)
    results, start = {}, time.perf_counter()
    hits = {"direction": 0, "tempo": 0, "both": 0, "direction_spectrogram": 0}
    total = 0
    for tempo in ("slow", "fast"):
        for direction in ("rising", "falling"):
            prompt = f"a {tempo} {direction} {args.kind}"
            pipe.cfg.sample.prompt = prompt
            specs = sample_spectrograms(pipe, list(range(args.num)))
            rows = []
            for spec in specs:
                wave = io.waveform(spec)
                log_mel = io.front.log_mel(wave.numpy())  # measured from the audio, not from the model's output
                got = (analysis.direction(log_mel, io.front), analysis.tempo(log_mel, io.front))
                rows.append({"direction": got[0], "tempo": got[1], "notes_per_second": round(analysis.notes_per_second(log_mel, io.front), 2),
                             "octaves_per_second": round(analysis.pitch_slope(log_mel, io.front), 3)})
                hits["direction"] += got[0] == direction
                hits["tempo"] += got[1] == tempo
                hits["both"] += got == (direction, tempo)
                hits["direction_spectrogram"] += analysis.direction(_log_mel(spec), io.front) == direction
                total += 1
            results[prompt] = {"direction_agreement": sum(r["direction"] == direction for r in rows) / len(rows),
                               "tempo_agreement": sum(r["tempo"] == tempo for r in rows) / len(rows),
                               "clips": rows}
            print(f"[bench] {prompt}: direction {results[prompt]['direction_agreement']:.2f}, "
                  f"tempo {results[prompt]['tempo_agreement']:.2f}", file=sys.stderr, flush=True)

    # One long clip: seams of the MultiDiffusion canvas.
    pipe.cfg.sample.prompt = f"a fast rising {args.kind}"
    frames = io.frames_for(args.long_duration)
    long_spec = sample_spectrograms(pipe, [0], frames=frames)[0]
    _, _, window = window_of(pipe.model)
    patch = int(pipe.model.patch_size)
    stride = max(patch, int(round(window * 0.5 / patch)) * patch)
    width = long_spec.shape[-1]
    starts = window_starts(-(-width // patch) * patch, window, stride)
    seams = sorted({s for s in starts if s > 0} | {s + window for s in starts if s + window < width})
    at, elsewhere = seam_jumps(long_spec, seams)
    long_wave = io.waveform(long_spec)
    segs = [long_spec[:, i:i + window] for i in range(0, width - window + 1, window)]
    rising = sum(analysis.direction(_log_mel(s), io.front) == "rising" for s in segs)
    out = {
        "run": args.run, "clips_per_prompt": args.num, "steps": pipe.cfg.sample.steps, "cfg_scale": pipe.cfg.sample.cfg_scale,
        "chance": 0.5,
        "direction_agreement": hits["direction"] / total, "tempo_agreement": hits["tempo"] / total,
        "both_agreement": hits["both"] / total, "direction_agreement_on_spectrogram": hits["direction_spectrogram"] / total,
        "long_clip": {"seconds": round(len(long_wave) / io.front.sample_rate, 2), "windows": len(starts),
                      "seam_change_max": round(float(at.max()), 4), "inside_change_median": round(float(elsewhere.median()), 4),
                      "inside_change_p95": round(float(elsewhere.quantile(0.95)), 4),
                      "inside_change_max": round(float(elsewhere.max()), 4),
                      "rising_segments": f"{rising}/{len(segs)}",
                      "notes_per_second": round(analysis.notes_per_second(io.front.log_mel(long_wave.numpy()), io.front), 2)},
        "per_prompt": {k: {kk: vv for kk, vv in v.items() if kk != "clips"} for k, v in results.items()},
        "seconds": round(time.perf_counter() - start, 1),
    }
    print(json.dumps(out, indent=1))
    return 0


def _log_mel(spec: torch.Tensor) -> torch.Tensor:
    from ditk.audio.mel import denormalize

    return denormalize(spec)


if __name__ == "__main__":
    sys.exit(main())
