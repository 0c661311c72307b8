"""`ditk edit SOURCE IMAGES...`: invert images and regenerate them towards another class or prompt."""

import click

from ._common import complete_presets, parse_options, split_overrides

METHODS = ("naive", "tic", "masactrl", "rf-edit", "fireflow", "rf-inversion", "custom")
INVERSIONS = ("ddim", "bdia", "edict", "euler", "rf-solver", "fireflow", "rf-inversion")


@click.command("edit")
@click.argument("source", type=click.Path())
@click.argument("images", nargs=-1, required=True, metavar="IMAGES... [KEY=VALUE]...")
@click.option("--preset", shell_complete=complete_presets, help="Architecture of a bare weights file.")
@click.option("--method", type=click.Choice(METHODS), default="naive", show_default=True, help="Edit method.")
@click.option("--class-labels", help="Target class of each image (cycled), e.g. 8 or 8,1.")
@click.option("--source-labels", help="Source class of each image; default: the null label.")
@click.option("--prompt", help="Target prompt (text models).")
@click.option("--source-prompt", help="Source prompt (text models); default: empty.")
@click.option("--steps", type=click.IntRange(1, 1000), default=25, show_default=True, help="Grid steps.")
@click.option("--inversion", type=click.Choice(INVERSIONS), help="Inversion method (default: the edit method's).")
@click.option("--opt", "opts", multiple=True, metavar="KEY=VALUE",
              help="Edit method option, e.g. --opt inject=3, --opt start_step=2 (repeatable; see README).")
@click.option("--spec", type=click.Path(), help="Injection spec YAML (with --method custom).")
@click.option("--mask", type=click.Path(dir_okay=False), help="Edit mask image (white = region to edit) for concat rules.")
@click.option("--cfg-scale", type=click.FloatRange(min=0), default=1.0, show_default=True,
              help="Guidance of the target branch in the edit pass (inversion never guides).")
@click.option("--resize", is_flag=True, help="Resize / convert images to the model's size and channels; resample audio clips and keep their first "
              "window.")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True, help="Seed (rf-inversion's noise target).")
@click.option("--weights", type=click.Choice(["ema", "model"]), default="ema", show_default=True, help="Which weights of a run.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, ...")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (default: <run>/edited/<method><steps>-<target>; an earlier edit output there is replaced).")
def command(source, images, preset, method, class_labels, source_labels, prompt, source_prompt, steps, inversion, opts,
            spec, mask, cfg_scale, resize, seed, weights, device, out):
    """Edit IMAGES (files, folders, or .safetensors artefacts of ditk invert; audio clips for audio models) with
    the model in SOURCE.

    \b
    Writes images/NNNNNN.png (edits), source_branch/ (methods with a source branch), grid.png (inputs over edits),
    samples.npz and report.json (NFE, seconds, PSNR/SSIM to the input, digits classifier success); prints the folder.
    Audio models: audio/NNNNNN.wav, spectrograms/, grid.png and report.json (log-spectral distance to the source).
      ditk edit runs/digits-dit-flow three.png --source-labels 3 --class-labels 8 --method rf-edit
      ditk edit runs/tones-fluxmusic clip.wav --source-prompt "a slow rising melody" --prompt "a slow falling melody"
    """
    from pathlib import Path

    from ditk.edit.run import run_edit
    from ditk.edit.spec import load_spec
    from ditk.errors import ConfigError
    from ditk.generate import load_pipeline

    images, overrides = split_overrides(images)

    if prompt is not None and class_labels is not None:
        raise ConfigError("give either --class-labels or --prompt, not both")
    knobs = parse_options(opts)
    pipe = load_pipeline(source, preset=preset, overrides=overrides, weights=weights, device=device)
    rules = load_spec(spec, len(pipe.model.blocks)) if spec else None
    run_root = pipe.run_dir if pipe.run_dir is not None else Path(".")
    from ditk.generate import prompt_tag

    target = prompt_tag(prompt) if prompt is not None else "to-" + "-".join(str(class_labels or "").replace(",", " ").split())
    out_dir = Path(out) if out else run_root / "edited" / f"{method}{steps}-{target}"
    report = run_edit(pipe, images, method, steps, knobs, inversion, rules, class_labels, prompt, source_labels,
                      source_prompt, cfg_scale, mask, out_dir, resize, seed)
    noun = "clip" if "clips" in report else "image"
    msg = (f"[ditk] {len(report.get('images', report.get('clips')))} {noun}(s) edited with {method} "
           f"({report['nfe_per_image']} NFE/{noun})")
    if "mean_lsd_to_source_db" in report:
        msg += f": log-spectral distance to the source {report['mean_lsd_to_source_db']:.2f} dB"
    if "edit_success" in report:
        msg += f": digits classifier says the target class for {100 * report['edit_success']:.0f} %"
    click.echo(msg, err=True)
    click.echo(str(out_dir))
