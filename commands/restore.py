"""`ditk restore SOURCE INPUTS... --task TASK [--method M]`: zero-shot restoration with a trained prior."""

import click

from ._common import complete_presets


def _pairs(values, flag):
    from ditk.errors import ConfigError
    import yaml

    out = {}
    for v in values:
        if "=" not in v or v.startswith("="):
            raise ConfigError(f"{flag} '{v}' is not KEY=VALUE (e.g. {flag} sigma=2)")
        key, value = v.split("=", 1)
        out[key.strip()] = yaml.safe_load(value) if value.strip() else value
    return out


@click.command("restore")
@click.argument("source", type=click.Path())
@click.argument("inputs", nargs=-1, required=True, metavar="INPUTS... [KEY=VALUE]...")
@click.option("--task", required=True, help="Degradation: sr2|sr4|sr8 (average pooling), sr4-bicubic, blur, motion-blur, "
              "inpaint-box, inpaint-random, inpaint-mask, colorize, denoise, cs.")
@click.option("--method", help="ddnm, ddrm, dps, pigdm (DDPM priors), pnp-flow (flow priors); default ddnm / pnp-flow.")
@click.option("--sigma-y", type=click.FloatRange(0), default=0.0, show_default=True,
              help="Measurement noise std on the [-1, 1] scale (DPS uses 0.05); with --degrade it is also added to y.")
@click.option("--degrade", is_flag=True, help="INPUTS are clean images: synthesise y = A x + noise first (benchmarking; "
              "PSNR/SSIM against them in report.json).")
@click.option("--resize", is_flag=True, help="Resize inputs of another size to what the model and task expect (bicubic).")
@click.option("--steps", type=click.IntRange(min=1, max=10000), help="Sampler steps (default: the method's: DPS 1000, DDRM 20, others 100).")
@click.option("--seed", type=click.IntRange(min=0), default=0, show_default=True, help="Image i uses the seed (seed, i).")
@click.option("--batch-size", type=click.IntRange(min=1), default=32, show_default=True, help="Images restored at once.")
@click.option("--task-opt", "task_opts", multiple=True, metavar="KEY=VALUE",
              help="Operator option, e.g. sigma=2 (blur), ratio=0.1 (cs), missing=0.7, mask=FILE.png (repeatable).")
@click.option("--method-opt", "method_opts", multiple=True, metavar="KEY=VALUE",
              help="Method option, e.g. zeta=1.0 (dps), travel_length=5 (ddnm), eta=0.85 (ddrm), samples=1 (pnp-flow) (repeatable).")
@click.option("--class-label", type=click.IntRange(min=0), help="Class-conditional priors: condition on this class "
              "(default: the null class, i.e. the unconditional model).")
@click.option("--fid-extractor", default="auto", show_default=True,
              help="With --degrade: feature network for FID/KID of the restored set against the truth: auto (the one "
              "made for the prior's data: photos or digits), photos, digits, inception (needs --weights-dir), none.")
@click.option("--weights-dir", type=click.Path(file_okay=False), help="Folder with the Inception weights "
              "(--fid-extractor inception; default $DITK_WEIGHTS_DIR).")
@click.option("--preset", shell_complete=complete_presets, help="Architecture of a bare weights file.")
@click.option("--weights", type=click.Choice(["ema", "model"]), default="ema", show_default=True, help="Which weights of a run.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (default: <run>/restored/<task>-<method>-...).")
@click.option("--overwrite", is_flag=True, help="Replace an existing output folder.")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def command(source, inputs, task, method, sigma_y, degrade, resize, steps, seed, batch_size, task_opts, method_opts,
            class_label, fid_extractor, weights_dir, preset, weights, device, out, overwrite, no_progress):
    """Restore INPUTS (images or folders) with the prior in SOURCE (a run, a checkpoint, or weights + --preset).

    \b
    Examples:
      ditk restore runs/photos-dit crops/ --task sr4 --degrade
      ditk restore runs/photos-dit low_res/*.png --task sr4 --method dps --sigma-y 0.05
      ditk restore runs/photos-dit-flow crops/ --task inpaint-box --method pnp-flow --degrade

    Writes restored/, degraded/, ground_truth/ (with --degrade), grid.png (degraded | restored | truth),
    samples.npz and report.json (settings, NFE, seconds; PSNR/SSIM when the truth is known); prints the folder.
    KEY=VALUE overrides (e.g. model.depth=4) apply to the prior's config as in `ditk sample`.
    """
    from pathlib import Path

    from ditk.errors import ConfigError

    # One variadic argument holds the inputs and the KEY=VALUE overrides (click allows one): an item with '='
    # that is not an existing path is an override.
    overrides = [a for a in inputs if "=" in a and not Path(a).exists()]
    inputs = [a for a in inputs if a not in overrides]
    if not inputs:
        raise ConfigError("no INPUTS: pass image files or folders after SOURCE")
    task_options, method_options = _pairs(task_opts, "--task-opt"), _pairs(method_opts, "--method-opt")

    from ditk.restore.operators import TASKS, build_operator  # noqa: F401
    from ditk.io import list_input_files
    from ditk.restore.pipeline import get_method, run

    if fid_extractor not in ("auto", "none"):
        from ditk.registry import FEATURE_EXTRACTORS

        FEATURE_EXTRACTORS.get(fid_extractor)  # an unknown name fails now, with a suggestion
    if task not in TASKS:
        build_operator(task, (3, 8, 8))  # raises the "did you mean" error
    files = list_input_files(inputs)

    from ditk.generate import load_pipeline
    from ditk.runs import resolve_checkpoint

    pipe = load_pipeline(source, preset=preset, overrides=overrides, weights=weights, device=device)
    method = method or ("pnp-flow" if pipe.objective.name == "rectified-flow" else "ddnm")
    get_method(method)
    if out is None:
        tag = f"{task}-{method}-sy{sigma_y:g}-seed{seed}" + (f"-steps{steps}" if steps else "")
        path = Path(source)
        if (path / "config.yaml").is_file() or (path / "state.pt").is_file():
            run_dir, _ = resolve_checkpoint(path)
            out = run_dir / "restored" / tag
        else:
            out = Path("restored") / f"{path.stem}-{tag}"
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output folder {out} exists: pass --overwrite or another --out")
    report = run(pipe, files=files, task=task, method=method, out_dir=out, task_options=task_options,
                 method_options=method_options, sigma_y=sigma_y, steps=steps, seed=seed, batch_size=batch_size,
                 degrade_inputs=degrade, resize=resize, progress=not no_progress, source=pipe.source,
                 class_label=class_label, fid_extractor=None if fid_extractor == "none" else fid_extractor,
                 weights_dir=weights_dir)
    line = f"[ditk] {report['num']} images, {report['nfe_per_image']} NFE each, {report['seconds']:.1f}s"
    if "metrics" in report:
        line += f", PSNR {report['metrics']['psnr_db']:.2f} dB, SSIM {report['metrics']['ssim']:.3f}"
        if report["metrics"].get("fid") is not None:
            line += f", FID {report['metrics']['fid']:.3f}, KID {report['metrics']['kid']:.4f}"
    click.echo(line, err=True)
    click.echo(str(out))
