"""`ditk sample RUN_OR_CHECKPOINT [key=value ...]`: generate images (PNGs, grid, .npz, report)."""

import click

from ._common import complete_presets, overrides_argument

# option name -> config key it sets (options win over key=value overrides)
SHORTCUTS = {"num": "sample.num", "batch_size": "sample.batch_size", "seed": "sample.seed",
             "solver": "sample.solver", "steps": "sample.steps", "cfg_scale": "sample.cfg_scale",
             "cfg_channels": "sample.cfg_channels", "class_labels": "sample.class_labels"}


@click.command("sample")
@click.argument("source", type=click.Path())
@overrides_argument
@click.option("--preset", shell_complete=complete_presets, help="Architecture of a bare weights file (.pt, .safetensors, diffusers folder).")
@click.option("--num", type=int, help="Number of images.")
@click.option("--batch-size", type=int, help="Images per forward pass (does not change the images).")
@click.option("--seed", type=int, help="Image i uses the seed (seed, i).")
@click.option("--solver", help="ddpm, ddim, dpm-solver++, unipc (DDPM models); euler, heun (flow models).")
@click.option("--steps", type=int, help="Number of solver steps.")
@click.option("--cfg-scale", type=float, help="Classifier-free guidance scale (1 = off).")
@click.option("--cfg-channels", type=int, help="Guide only the first N channels (DiT's convention: 3).")
@click.option("--class-labels", help="'uniform' (i mod classes), 'random', or a list such as 1,7,9.")
@click.option("--weights", type=click.Choice(["ema", "model"]), default="ema", show_default=True)
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (default: <run>/generated/<ckpt>-<settings>).")
@click.option("--no-progress", is_flag=True)
def command(source, overrides, preset, weights, device, out, no_progress, **shortcuts):
    """Sample from SOURCE: a run directory, a checkpoints/step-N folder, or weights + --preset.

    \b
    Examples:
      ditk sample runs/digits-dit
      ditk sample runs/digits-dit --class-labels 3 --num 16 --cfg-scale 3
      ditk sample DiT-XL-2-256x256.pt --preset dit-xl-2 autoencoder.path=/models/sd-vae-ft-ema \\
          --cfg-scale 4 --class-labels 207,360,387,974,88,979,417,279

    Writes images/NNNNNN.png, grid.png, samples.npz (uint8 NHWC arr_0, for FID tools) and report.json;
    prints the output folder on stdout. Rerunning completes a partial output folder.
    """
    from pathlib import Path

    from ditk.generate import default_out_dir, generate_to_dir, load_pipeline

    extra = [f"{SHORTCUTS[k]}={_value(v)}" for k, v in shortcuts.items() if v is not None]
    pipe = load_pipeline(source, preset=preset, overrides=[*overrides, *extra], weights=weights, device=device)
    out_dir = Path(out) if out else default_out_dir(pipe, source)
    report = generate_to_dir(pipe, out_dir, progress=not no_progress)
    click.echo(f"[ditk] {report['generated_now']} images in {report['seconds']:.1f}s", err=True)
    click.echo(str(out_dir))


def _value(v):
    # A label list such as 1,7,9 must reach the config as a string, not a YAML list.
    return f"'{v}'" if isinstance(v, str) and "," in v else v
