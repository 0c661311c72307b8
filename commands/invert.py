"""`ditk invert SOURCE IMAGES...`: map images to the noise (and trajectory, features) that regenerates them."""

import click

from ._common import complete_presets, parse_options, split_overrides

METHODS = ("ddim", "bdia", "edict", "euler", "rf-solver", "fireflow", "rf-inversion")


@click.command("invert")
@click.argument("source", type=click.Path())
@click.argument("images", nargs=-1, required=True, metavar="IMAGES... [KEY=VALUE]...")
@click.option("--preset", shell_complete=complete_presets, help="Architecture of a bare weights file.")
@click.option("--method", type=click.Choice(METHODS), help="Inversion method (default: ddim for DDPM models, "
              "rf-solver for flow models).")
@click.option("--steps", type=click.IntRange(1, 1000), default=50, show_default=True, help="Grid steps.")
@click.option("--opt", "opts", multiple=True, metavar="KEY=VALUE",
              help="Method option: bdia gamma; edict p; rf-inversion gamma; flow methods shift (repeatable).")
@click.option("--class-labels", help="Source class of each image (cycled); default: the null label.")
@click.option("--prompt", help="Source prompt (text models); default: the empty prompt.")
@click.option("--cfg-scale", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Must be 1: inversion runs without guidance.")
@click.option("--save-trajectory", is_flag=True, help="Also store the points the model was evaluated at.")
@click.option("--save-features", is_flag=True, help="Also store every block's attention K, V and output (for ditk edit).")
@click.option("--reconstruct", is_flag=True, help="Regenerate from the noise and report latent MSE, PSNR, SSIM "
              "(and the VAE round-trip bound for latent models); audio: the regenerated WAV and the log-spectral "
              "distance.")
@click.option("--resize", is_flag=True, help="Resize / convert images to the model's size and channels; resample "
              "audio clips and keep their first window.")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True, help="Images per pass.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Seed (rf-inversion's noise target).")
@click.option("--weights", type=click.Choice(["ema", "model"]), default="ema", show_default=True, help="Which weights of a run.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, ...")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (default: <run>/inverted/<method><steps>; an earlier invert output there is replaced).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def command(source, images, preset, method, steps, opts, class_labels, prompt, cfg_scale, save_trajectory,
            save_features, reconstruct, resize, batch_size, seed, weights, device, out, no_progress):
    """Invert IMAGES (files or folders; audio clips for audio models) with the model in SOURCE (a run, a
    checkpoint, or weights + --preset).

    \b
    Writes per image NAME.safetensors (terminal noise, the input latent, optional trajectory and features; metadata:
    model, schedule, steps, method, conditioning, VAE) and report.json; prints the folder.
      ditk invert runs/digits-dit-flow digits/ --method rf-solver --steps 25 --reconstruct
      ditk invert runs/tones-fluxmusic clip.wav --prompt "a slow rising melody" --reconstruct
    """
    from pathlib import Path

    from ditk.edit.inversion import DEFAULT_METHOD
    from ditk.edit.run import run_invert
    from ditk.errors import ConfigError
    from ditk.generate import load_pipeline

    images, overrides = split_overrides(images)

    if cfg_scale != 1.0:
        raise ConfigError(f"inversion runs without guidance (scale 1); --cfg-scale {cfg_scale:g} would make it "
                          "non-invertible: drop it (guide in ditk edit instead)")
    options = parse_options(opts)
    pipe = load_pipeline(source, preset=preset, overrides=overrides, weights=weights, device=device)
    method = method or DEFAULT_METHOD.get(pipe.objective.name, "ddim")
    run_root = pipe.run_dir if pipe.run_dir is not None else Path("inverted")
    out_dir = Path(out) if out else (run_root / "inverted" if pipe.run_dir else run_root) / f"{method}{steps}"
    report = run_invert(pipe, images, method, steps, options, class_labels, prompt, out_dir, save_trajectory,
                        save_features, reconstruct, resize, batch_size, seed, not no_progress)
    if reconstruct and "mean_lsd_db" in report:
        click.echo(f"[ditk] {len(report['images'])} clip(s), {method} {steps} steps: reconstruction latent MSE "
                   f"{report['mean_latent_mse']:.3g}, log-spectral distance {report['mean_lsd_db']:.2f} dB "
                   f"({report['mean_wav_lsd_db']:.2f} dB after the vocoder)", err=True)
    elif reconstruct:
        click.echo(f"[ditk] {len(report['images'])} image(s), {method} {steps} steps: reconstruction "
                   f"{report['mean_psnr_db']:.2f} dB PSNR", err=True)
    click.echo(str(out_dir))
