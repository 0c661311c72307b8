"""MusicCM student against its FluxMusic teacher, side by side in one run: caption following, audio FAD, speed.

    python benchmarks/bench_musiccm.py --root /tmp/bench-musiccm [--teacher RUN] [--student RUN] [--features RUN]
        [--teacher-steps 400] [--distill-steps 400] [--ajepa-steps 300] [--clips 32] [--json out.json]

What it builds when not given (everything tiny, on CPU, a few minutes):
  teacher   `ditk train tones-fluxmusic` shrunk exactly as tests/test_music_captions.py shrinks it (its OVERRIDES:
            1 double + 1 single block of width 128, 32 mel bands to 4 kHz, 128 clips), --teacher-steps steps;
  student   `ditk distill tones-musiccm` from that teacher (same model/data overrides), --distill-steps steps;
  features  `ditk train a-jepa-tiny` on the same front end (32 bands to 4 kHz; 4 x 4 patches: an 8 x 16 grid),
            width 64, --ajepa-steps steps:
            the A-JEPA feature network of the FAD (never seen by the student's discriminator, which reads the
            teacher's features).
Rows: the teacher with its preset's sampler (Euler, 30 steps, CFG 4), the same teacher at 4 Euler steps (what 4
steps give without distillation) and the student with its config's sampler (lcm, 4 steps, no CFG); with
--ablate-adversarial also a student distilled the same way without the discriminator (distill.adv_weight=0). For each row, on the same noise seeds:
  caption   ditk.audio.analysis.caption_following (the caption test's measurement): --clips clips for each of
            "a {slow|fast} {rising|falling} melody", vocoded (Griffin-Lim) and the pitch direction estimated from
            the WAV samples; agreement with the prompt (chance 0.5)
  FAD       those 4 x --clips WAVs against as many held-out synthesised melodies (data seed 7), A-JEPA features
            (ditk.metrics.audio.evaluate, `ditk evaluate-fid --modality audio`'s code); `fad_real_vs_real` is the
            floor: as many other real melodies (data seed 8) against the same reference
  s/min     CPU seconds (time.process_time, one thread) to generate one 60 s clip with the long-clip sampler
            (overlapping 2 s windows, MultiDiffusion), spectrogram only, and with the Griffin-Lim vocoder
  NFE       model evaluations per window: steps x 2 with CFG
Prints one JSON object on stdout. Not part of the test suite.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def teacher_overrides() -> list:
    """The caption test's shrunk tones-fluxmusic (imported, so the benchmark measures what the test trains)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from test_music_captions import OVERRIDES

    return list(OVERRIDES)


def ditk(*args) -> str:
    cmd = ["ditk", *map(str, args), "--no-progress"]
    print(f"[bench] {' '.join(cmd)}", file=sys.stderr, flush=True)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout.strip()


def build_runs(args) -> tuple[str, str, str]:
    shrunk = teacher_overrides()
    teacher = args.teacher
    if not teacher:
        ditk("train", "tones-fluxmusic", *shrunk, f"train.max_steps={args.teacher_steps}",
             f"train.ckpt_every={args.teacher_steps}", "sample.steps=30", f"run.dir={args.root}")
        teacher = str(Path(args.root) / "tones-fluxmusic")
    student = args.student
    if not student:
        keep = [o for o in shrunk if o.split("=")[0].startswith(("model.", "data.", "conditioner.", "run.seed"))]
        ditk("distill", "tones-musiccm", *keep, f"distill.teacher={teacher}", f"train.max_steps={args.distill_steps}",
             f"train.ckpt_every={args.distill_steps}", "train.log_every=25", *args.distill_override,
             f"run.dir={args.root}")
        student = str(Path(args.root) / "tones-musiccm")
    ablation = ""
    if args.ablate_adversarial:  # the same distillation without the discriminator: what the adversarial term adds
        keep = [o for o in shrunk if o.split("=")[0].startswith(("model.", "data.", "conditioner.", "run.seed"))]
        ablation = str(Path(args.root) / "tones-musiccm-no-adv")
        if not Path(ablation).exists():
            ditk("distill", "tones-musiccm", *keep, f"distill.teacher={teacher}", f"train.max_steps={args.distill_steps}",
                 f"train.ckpt_every={args.distill_steps}", "train.log_every=25", *args.distill_override,
                 "distill.adv_weight=0", "run.name=tones-musiccm-no-adv", f"run.dir={args.root}")
    features = args.features
    if not features:
        ditk("train", "a-jepa-tiny", "model.input_size=32", "model.patch_size=4", "data.n_mels=32", "data.fmax=4000",
             "model.hidden_size=64",
             "model.num_heads=4", "data.num_clips=1024", f"train.max_steps={args.ajepa_steps}",
             f"train.ckpt_every={args.ajepa_steps}", "optim.warmup_steps=20", f"run.dir={args.root}")
        features = str(Path(args.root) / "a-jepa-tiny")
    return teacher, student, features, ablation


def write_wavs(folder: Path, waves, sample_rate: int) -> None:
    from ditk.audio.mel import write_wav

    folder.mkdir(parents=True, exist_ok=True)
    for i, wave in enumerate(waves):
        write_wav(folder / f"{i:05d}.wav", wave, sample_rate)


def reference_wavs(pipe, n: int, folder: Path, seed: int = 7) -> None:
    """n held-out synthesised melodies (data seed 7: not the training clips), as real audio."""
    from ditk.registry import DATASETS

    data = {k: v for k, v in pipe.cfg.data.items() if k != "name"}
    held_out = DATASETS.build("music", DATASETS.get("music").config(**{**data, "seed": seed, "num_clips": 50 * n}))
    waves = [held_out.waveform(i) for i in range(len(held_out)) if held_out.spec(i).kind == "melody"][:n]
    write_wavs(folder, waves, int(pipe.cfg.data.sample_rate))


def seconds_per_minute(pipe, seconds: float = 60.0) -> tuple[float, float]:
    """(CPU s to generate `seconds` of audio as a spectrogram, CPU s with the vocoder too), per minute of audio."""
    from ditk.audio.generate import AudioOutput, sample_spectrograms

    io = AudioOutput(pipe)
    pipe.cfg.sample.prompt = "a fast rising melody"
    sample_spectrograms(pipe, [0], frames=io.frames_for(4.0))  # warm-up
    start = time.process_time()
    spec = sample_spectrograms(pipe, [0], frames=io.frames_for(seconds))[0]
    generate = time.process_time() - start
    io.waveform(spec)
    total = time.process_time() - start
    scale = 60.0 / seconds
    return generate * scale, total * scale


def measure(name: str, run: str, overrides: list, features: str, ref: Path, clips: int, work: Path) -> dict:
    import torch

    from ditk.audio import analysis
    from ditk.generate import load_pipeline
    from ditk.metrics.audio import evaluate

    torch.set_num_threads(1)
    pipe = load_pipeline(run, overrides=["sample.seed=0", *overrides], device="cpu")
    sc = pipe.cfg.sample
    print(f"[bench] {name}: {sc.solver} {sc.steps} steps, cfg {sc.cfg_scale}", file=sys.stderr, flush=True)
    score = analysis.caption_following(pipe, clips)
    waves = [w for prompt in score["measured"] for w in score["waves"][prompt]]
    write_wavs(work / name, waves, int(pipe.cfg.data.sample_rate))
    fad = evaluate(str(work / name), str(ref), features, kid=False, use_cache=False, progress=False)["fad"]
    gen_s, total_s = seconds_per_minute(pipe)
    agree = score["agree"]
    return {"row": name, "run": run, "solver": sc.solver, "steps": int(sc.steps), "cfg_scale": float(sc.cfg_scale),
            "nfe_per_window": int(sc.steps) * (2 if float(sc.cfg_scale) != 1.0 else 1),
            "caption_agreement": (agree["rising"] + agree["falling"]) / score["total"],
            "rising": f"{agree['rising']}/{2 * clips}", "falling": f"{agree['falling']}/{2 * clips}",
            "fad": round(float(fad), 3), "s_per_min_spectrogram": round(gen_s, 2),
            "s_per_min_with_vocoder": round(total_s, 2)}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default="runs/bench-musiccm", help="where the runs are trained when not given")
    parser.add_argument("--teacher", default="", help="a tones-fluxmusic run (else the caption test's shrunk one)")
    parser.add_argument("--student", default="", help="a tones-musiccm run of that teacher (else distilled here)")
    parser.add_argument("--features", default="", help="an A-JEPA run on the teacher's front end (else trained here)")
    parser.add_argument("--teacher-steps", type=int, default=400)
    parser.add_argument("--distill-steps", type=int, default=400)
    parser.add_argument("--distill-override", action="append", default=[], help="extra KEY=VALUE for ditk distill")
    parser.add_argument("--ajepa-steps", type=int, default=300)
    parser.add_argument("--ablate-adversarial", action="store_true",
                        help="also distill and measure the student without the discriminator (distill.adv_weight=0)")
    parser.add_argument("--teacher-sample-steps", type=int, default=30, help="the teacher's Euler steps (preset: 30)")
    parser.add_argument("--clips", type=int, default=32, help="clips per prompt (4 prompts)")
    parser.add_argument("--json", default="", help="also write the result here")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    teacher, student, features, ablation = build_runs(args)
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        from ditk.generate import load_pipeline

        teacher_pipe = load_pipeline(teacher, device="cpu")
        reference_wavs(teacher_pipe, 4 * args.clips, work / "reference")
        # The FAD's floor at this set size: as many other real melodies (data seed 8) against the reference.
        reference_wavs(teacher_pipe, 4 * args.clips, work / "real", seed=8)
        from ditk.metrics.audio import evaluate

        floor = evaluate(str(work / "real"), str(work / "reference"), features, kid=False, use_cache=False,
                         progress=False)["fad"]
        rows = [measure("teacher", teacher, [f"sample.steps={args.teacher_sample_steps}"], features, work / "reference",
                        args.clips, work),
                measure("teacher-4-steps", teacher, ["sample.steps=4"], features, work / "reference", args.clips, work),
                measure("musiccm", student, [], features, work / "reference", args.clips, work)]
        if ablation:
            rows.append(measure("musiccm-no-adv", ablation, [], features, work / "reference", args.clips, work))
    out = {"rows": rows, "clips_per_prompt": args.clips, "reference": f"{4 * args.clips} held-out synthesised melodies",
           "fad_real_vs_real": round(float(floor), 3),
           "features": features, "speedup_s_per_min": round(rows[0]["s_per_min_spectrogram"] /
                                                            rows[2]["s_per_min_spectrogram"], 2),
           "seconds": round(time.perf_counter() - start, 1)}
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
