"""`ditk sample RUN_OR_CHECKPOINT [key=value ...]`: generate images (PNGs, grid, .npz, report)."""

import json

import click

from ._common import complete_presets, overrides_argument

# option name -> config key it sets (options win over key=value overrides)
SHORTCUTS = {"num": "sample.num", "batch_size": "sample.batch_size", "seed": "sample.seed",
             "solver": "sample.solver", "steps": "sample.steps", "cfg_scale": "sample.cfg_scale",
             "cfg_channels": "sample.cfg_channels", "class_labels": "sample.class_labels", "prompt": "sample.prompt",
             "cache": "sample.cache", "precision": "sample.precision", "time_shift_window": "sample.time_shift_window",
             "shift": "sample.solver_options.shift"}


@click.command("sample")
@click.argument("source", type=click.Path())
@overrides_argument
@click.option("--preset", shell_complete=complete_presets, help="Architecture of a bare weights file (.pt, .safetensors, diffusers folder).")
@click.option("--num", type=click.IntRange(1), help="Number of images.")
@click.option("--batch-size", type=click.IntRange(1), help="Images per forward pass (does not change the images).")
@click.option("--seed", type=click.IntRange(0), help="Image i uses the seed (seed, i).")
@click.option("--solver", help="ddpm, ddim, dpm-solver++, unipc (DDPM models); euler, heun (flow models); lcm (consistency-distilled students).")
@click.option("--steps", type=click.IntRange(1), help="Number of solver steps.")
@click.option("--cfg-scale", type=click.FloatRange(0), help="Classifier-free guidance scale (1 = off); a student with an embedded guidance scale (LCM-style, model.guidance_embed) takes it as its input, one forward per step.")
@click.option("--cfg-channels", type=click.IntRange(1), help="Guide only the first N channels (DiT's convention: 3).")
@click.option("--class-labels", help="'uniform' (i mod classes), 'random', or a list such as 1,7,9.")
@click.option("--prompt", help="Text prompt for every image (text-conditioned models, e.g. Dimba).")
@click.option("--weights", type=click.Choice(["ema", "model"]), default="ema", show_default=True,
              help="Which weights of a run's checkpoint: the EMA average or the raw model.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (default: <run>/generated/<ckpt>-<settings>).")
@click.option("--no-progress", is_flag=True, help="No progress bar on stderr (logs still go there).")
@click.option("--moe-stats", is_flag=True, help="Mixture-of-experts models: also write which experts each token chose "
              "(moe_stats.json, moe_routing.npz, moe_heatmap.png by timestep, class and position).")
@click.option("--cache", help="Feature caching: none, fora, taylorseer, delta-dit, fbc, teacache (see README).")
@click.option("--cache-opt", "cache_opts", multiple=True, metavar="KEY=VALUE",
              help="A cache policy option, e.g. --cache-opt interval=4 (repeatable).")
@click.option("--calibrate", is_flag=True, help="TeaCache: fit its rescaling polynomial for this run first (runs/<name>/teacache.json).")
@click.option("--compile", "compile_", is_flag=True, help="torch.compile the blocks (or the cached sub-modules).")
@click.option("--precision", type=click.Choice(["fp32", "bf16"]), help="bf16: autocast the model to bfloat16 (CUDA, or CPUs with bf16 units: AMX / AVX512-BF16).")
@click.option("--shift", type=click.FloatRange(0, min_open=True), help="Flow models: shift of the sampling schedule, t' = s t / (1 + (s - 1) t) (SD3).")
@click.option("--time-shift-window", type=click.IntRange(0), help="Time-shift sampler (with --solver ddim): candidate timesteps per step.")
@click.option("--compare-to-full", is_flag=True, help="Also sample the same seeds without the cache: speed-up and PSNR in report.json.")
@click.option("--duration", type=click.FloatRange(min=0, min_open=True),
              help="Audio models: seconds per clip (beyond the training window: overlapping windows, MultiDiffusion).")
@click.option("--images", multiple=True, help="Captioning runs: caption these pictures (files or folders; "
              "`--images a.png b.png`). Without it a captioning run captions its held-out split and scores it.")
@click.option("--num-captions", type=click.IntRange(1), help="Captioning runs: captions per image, each from its own seed (default 1).")
@click.option("--resize", is_flag=True, help="Captioning runs: scale --images to the image encoder's size.")
def command(source, overrides, preset, weights, device, out, no_progress, moe_stats, cache_opts, calibrate, compile_,
            compare_to_full, duration, images, num_captions, resize, **shortcuts):
    """Sample from SOURCE: a run directory, a checkpoints/step-N folder, or weights + --preset.

    \b
    Examples:
      ditk sample runs/digits-dit
      ditk sample runs/digits-dit --class-labels 3 --num 16 --cfg-scale 3
      ditk sample DiT-XL-2-256x256.pt --preset dit-xl-2 autoencoder.path=/models/sd-vae-ft-ema \\
          --cfg-scale 4 --class-labels 207,360,387,974,88,979,417,279

    Writes images/NNNNNN.png, grid.png, samples.npz (uint8 NHWC arr_0, for FID tools) and report.json;
    audio models write audio/NNNNNN.wav and spectrograms/NNNNNN.png instead (e.g. ditk sample
    runs/tones-fluxmusic --prompt "a fast rising melody" --duration 20). Captioning runs write captions.jsonl,
    contact_sheet.png and report.json (ditk sample runs/digits-caption --images a.png b.png --num-captions 3).
    Prints the output folder on stdout. Rerunning completes a partial output folder.
    """
    from pathlib import Path

    from ditk.errors import ConfigError
    from ditk.generate import default_out_dir, generate_to_dir, load_pipeline

    extra = [f"{SHORTCUTS[k]}={_value(v)}" for k, v in shortcuts.items() if v is not None]
    for opt in cache_opts:
        if "=" not in opt or opt.startswith("="):
            raise ConfigError(f"--cache-opt '{opt}' is not KEY=VALUE (e.g. --cache-opt interval=4)")
        extra.append(f"sample.cache_options.{opt}")
    if compile_:
        extra.append("sample.compile=true")
    if images:  # captioning: the paths after the first arrive among the positional KEY=VALUE arguments
        from ditk.caption.generate import image_paths

        images, overrides = image_paths(images, overrides)
    pipe = load_pipeline(source, preset=preset, overrides=[*overrides, *extra], weights=weights, device=device)
    from ditk.generate import modality

    if images or num_captions is not None or resize or modality(pipe.cfg) == "caption":
        from ditk.caption.generate import caption_command

        click.echo(str(caption_command(pipe, source, out, images, num_captions, resize, not no_progress)))
        return
    out_dir = Path(out) if out else default_out_dir(pipe, source, duration)
    from ditk.moe_stats import expert_usage

    if moe_stats and (calibrate or compare_to_full):  # they run extra sampling passes the report would mix in
        raise ConfigError("--moe-stats records one sampling pass: run it without --calibrate / --compare-to-full")
    with expert_usage(pipe, out_dir, enabled=moe_stats):  # --moe-stats: routing hooks on the model
        if calibrate:
            from ditk.cache.pipeline import calibrate_teacache

            click.echo(f"[ditk] TeaCache coefficients written to {calibrate_teacache(pipe)}", err=True)
        report = generate_to_dir(pipe, out_dir, progress=not no_progress, compare_to_full=compare_to_full,
                                 duration=duration)
    noun = "clips" if "clip_seconds" in report else "images"  # audio runs report their clip length
    click.echo(f"[ditk] {report['generated_now']} {noun} in {report['seconds']:.1f}s", err=True)
    if compare_to_full:
        c = report["comparison"]
        psnr = "identical" if c["psnr_db"] is None else f"PSNR {c['psnr_db']:.2f} dB"
        click.echo(f"[ditk] {report['cache']['policy']}: {c['speedup']}x faster than full compute, {psnr}", err=True)
    click.echo(str(out_dir))


def _value(v):
    # Labels such as 1,7,9 and free-text prompts must reach the config as one string: a JSON string is
    # a YAML double-quoted scalar, which the override parser reads back verbatim.
    return json.dumps(v) if isinstance(v, str) else v
