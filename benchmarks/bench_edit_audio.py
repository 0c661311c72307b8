"""Inversion and prompt editing of audio clips with a text-to-music run (tones-fluxmusic), side by side, one run.

    ditk train tones-fluxmusic          # or a shrunk run (see the README's inversion and editing section)
    OMP_NUM_THREADS=1 python benchmarks/bench_edit_audio.py --run runs/tones-fluxmusic

Held-out synthesised clips (data seed 7, melodies and chord progressions, as `ditk invert` reads them: the run's
front end, normalised log-mel). Inversion: per method and step count, under the clip's caption (no guidance), the
latent MSE and the log-spectral distance (LSD, dB; ditk.edit.audio) of the regenerated spectrogram, and the NFE.
Editing: each clip's caption ("a slow rising melody on a flute") is edited to the opposite pitch direction ("a slow
falling melody on a flute"); success = the pitch direction estimated from the edited spectrogram
(ditk.audio.analysis, right on every held-out training-style clip) is the target's; preservation = LSD to the
source and whether the estimated tempo (note rate) is kept. Metrics are on spectrograms (no vocoder). Prints
markdown tables and writes --json.
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

EDITS = [  # (method, inversion or None for the method's own, knobs, cfg scale)
    ("naive", "rf-solver", {}, 1.0), ("naive", "rf-solver", {}, None), ("naive", "euler", {}, None),
    ("masactrl", "euler", {}, None), ("rf-edit", "rf-solver", {}, None), ("rf-edit", "rf-solver", {"inject": 10}, None),
    ("fireflow", "fireflow", {}, None), ("rf-inversion", None, {}, None),
]


def held_out(pipe, num: int):
    """Spectrograms (N, 1, n_mels, frames) of `num` held-out clips through the invert path, with their specs."""
    import soundfile as sf
    import tempfile
    from pathlib import Path

    from ditk.data.music import MusicConfig, SynthMusic
    from ditk.edit.audio import Clips

    data = {k: v for k, v in pipe.cfg.data.items() if k != "name"}
    ds = SynthMusic(MusicConfig(**{**data, "seed": 7, "num_clips": num}))
    clips = Clips(pipe)
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i in range(num):  # the clip files `ditk invert` would read (float WAV)
            paths.append(Path(tmp) / f"{i}.wav")
            sf.write(str(paths[-1]), ds.waveform(i), clips.rate, subtype="FLOAT")
        spec, _ = clips.load(paths, resize=False)
    return spec, [ds.spec(i) for i in range(num)], clips


def prompt(spec, direction=None) -> str:
    from dataclasses import replace

    from ditk.audio.synth import caption

    return caption(replace(spec, direction=direction or spec.direction), "no key")


def inversion_table(pipe, x0, cond, steps_list):
    from ditk.edit.audio import log_spectral_distance
    from ditk.edit.inversion import invert, reconstruct

    src = pipe.autoencoder.decode(x0)
    rows = []
    for method in ("euler", "rf-solver", "fireflow"):
        for steps in steps_list:
            t0 = time.perf_counter()
            inv = invert(pipe.model, pipe.objective, x0, cond, method, steps)
            rec, nfe = reconstruct(pipe.model, pipe.objective, inv, cond, method, steps)
            sec = time.perf_counter() - t0
            lsd = float(np.mean(log_spectral_distance(pipe.autoencoder.decode(rec), src)))
            rows.append({"method": method, "steps": steps, "nfe": inv.nfe + nfe, "latent_mse": float(((rec - x0) ** 2).mean()),
                         "lsd_db": lsd, "seconds_per_clip": sec / len(x0)})
            print(f"[bench] invert {method:10s} {steps:3d} steps: LSD {lsd:.3f} dB, NFE {inv.nfe + nfe}", flush=True)
    return rows


def edit_table(pipe, clips, x0, specs, steps, cfg_default):
    from ditk.audio import analysis
    from ditk.audio.mel import denormalize
    from ditk.edit.audio import log_spectral_distance
    from ditk.edit.editors import edit, plan

    dev = pipe.device
    flip = {"rising": "falling", "falling": "rising"}
    src = pipe.conditioner.encode_prompts([prompt(s) for s in specs], dev)
    tgt = pipe.conditioner.encode_prompts([prompt(s, flip[s.direction]) for s in specs], dev)
    null = pipe.conditioner.uncond(len(specs), dev)
    source = pipe.autoencoder.decode(x0)
    measure = lambda x, f: [f(denormalize(s[0]), clips.front) for s in x]  # noqa: E731
    src_dir, src_tempo = measure(source, analysis.direction), measure(source, analysis.tempo)
    control = float(np.mean([d == s.direction for d, s in zip(src_dir, specs)]))
    print(f"[bench] control: the pitch direction of the source clips is estimated right for {control:.2f}", flush=True)
    rows = []
    for method, inversion, knobs, cfg in EDITS:
        cfg = cfg_default if cfg is None else cfg
        p = plan(method, pipe.objective, len(pipe.model.blocks), steps, knobs, inversion)
        res = edit(pipe.model, pipe.objective, x0, src, tgt, null, p, steps, cfg_scale=cfg)
        out = pipe.autoencoder.decode(res["edited"])
        dirs, tempi = measure(out, analysis.direction), measure(out, analysis.tempo)
        row = {"method": method, "inversion": p.inversion, "knobs": knobs, "cfg_scale": cfg, "steps": steps,
               "success": float(np.mean([d == flip[s.direction] for d, s in zip(dirs, specs)])),
               "lsd_to_source_db": float(np.mean(log_spectral_distance(out, source))),
               "tempo_kept": float(np.mean([a == b for a, b in zip(tempi, src_tempo)])),
               "nfe": res["nfe"], "seconds_per_clip": res["seconds"] / len(x0)}
        rows.append(row)
        print(f"[bench] edit {method:12s} {json.dumps(knobs):16s} cfg {cfg}: success {row['success']:.2f} "
              f"LSD {row['lsd_to_source_db']:.2f} dB tempo kept {row['tempo_kept']:.2f}", flush=True)
    return rows, control


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--run", required=True, help="a tones-fluxmusic run directory")
    ap.add_argument("--num", type=int, default=16, help="held-out clips")
    ap.add_argument("--steps", default="10,25,50", help="inversion step counts")
    ap.add_argument("--edit-steps", type=int, default=25)
    ap.add_argument("--cfg-scale", type=float, default=4.0, help="guidance of the edit pass (the preset samples at 4)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", default="bench_edit_audio.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from ditk.generate import load_pipeline

    pipe = load_pipeline(args.run, device="cpu")
    spec, specs, clips = held_out(pipe, args.num)
    x0 = pipe.autoencoder.encode(spec.to(pipe.device))
    cond = pipe.conditioner.encode_prompts([prompt(s) for s in specs], pipe.device)
    inv = inversion_table(pipe, x0, cond, [int(s) for s in args.steps.split(",")])
    ed, control = edit_table(pipe, clips, x0, specs, args.edit_steps, args.cfg_scale)

    print(f"\n{args.num} held-out clips ({sum(s.direction == 'rising' for s in specs)} rising), source direction "
          f"estimated right for {control:.2f}")
    print("\n| method | steps | NFE (invert + reconstruct) | latent MSE | LSD dB | s/clip |")
    print("|---|---|---|---|---|---|")
    for r in inv:
        print(f"| `{r['method']}` | {r['steps']} | {r['nfe']} | {r['latent_mse']:.2e} | {r['lsd_db']:.3f} | "
              f"{r['seconds_per_clip']:.3f} |")
    print("\n| method | inversion | knobs | CFG | steps | direction flipped | LSD to source dB | tempo kept | NFE/clip | s/clip |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in ed:
        knobs = ", ".join(f"{k}={v}" for k, v in r["knobs"].items()) or "defaults"
        print(f"| `{r['method']}` | {r['inversion']} | {knobs} | {r['cfg_scale']:g} | {r['steps']} | {r['success']:.2f} | "
              f"{r['lsd_to_source_db']:.2f} | {r['tempo_kept']:.2f} | {r['nfe']} | {r['seconds_per_clip']:.3f} |")
    with open(args.json, "w") as f:
        json.dump({"settings": vars(args), "control": control, "inversion": inv, "edit": ed}, f, indent=2)


if __name__ == "__main__":
    main()
