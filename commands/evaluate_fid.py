"""`ditk evaluate-fid GEN REF`: FID and KID through clean-fid, offline, for folders, .npz batches, statistics
files and trained runs. Torch-free at import (help and completion stay fast); the runtime is ditk.metrics."""

import json

import click

MODES = ("clean", "legacy_tensorflow", "legacy_pytorch")
SHORTCUTS = {"solver": "sample.solver", "steps": "sample.steps", "cfg_scale": "sample.cfg_scale"}


@click.command("evaluate-fid")
@click.argument("inputs", nargs=-1, metavar="[GEN] [REF] [KEY=VALUE]...", type=click.Path())
@click.option("--extractor", default="auto", show_default=True,
              help="Feature extractor: inception (the FID standard), digits (for 8x8 digits) or photos (for 32x32 "
                   "crops of the photos data set; trained by ditk, not Inception); auto = digits / photos with --run "
                   "on a run trained on that data set, inception otherwise.")
@click.option("--mode", type=click.Choice(MODES), default="clean", show_default=True,
              help="clean-fid protocol (how images reach 299x299).")
@click.option("--weights-dir", type=click.Path(file_okay=False),
              help="Folder holding the Inception weights (default: $DITK_WEIGHTS_DIR). Never downloaded.")
@click.option("--out", type=click.Path(dir_okay=False), help="Also write the JSON result to this file.")
@click.option("--save-stats", type=click.Path(dir_okay=False),
              help="Write REF's statistics (mu, sigma, features, protocol) to this .npz for reuse as REF.")
@click.option("--cache-dir", type=click.Path(file_okay=False),
              help="Reference-statistics cache (default: $DITK_CACHE_DIR/fid-stats or ~/.cache/ditk/fid-stats).")
@click.option("--no-cache", is_flag=True, help="Neither read nor write the reference-statistics cache.")
@click.option("--kid/--no-kid", default=True, show_default=True, help="Also compute KID (needs features on both sides).")
@click.option("--kid-subsets", type=click.IntRange(1), default=100, show_default=True,
              help="KID: number of random subsets averaged.")
@click.option("--kid-subset-size", type=click.IntRange(2), default=1000, show_default=True,
              help="KID: images per subset (capped at the smaller set's size).")
@click.option("--seed", type=click.IntRange(0), default=0, show_default=True,
              help="Seed of the KID subsets and of --run's samples.")
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True, help="Images per feature batch.")
@click.option("--workers", type=click.IntRange(0),
              help="Resize worker processes (default: 0 below 1000 images, else up to 8).")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--run", "run_dir", type=click.Path(file_okay=False), help="Sample a trained run (runs/NAME) as GEN.")
@click.option("--num", type=click.IntRange(2), help="With --run: number of images to sample.")
@click.option("--samples-dir", type=click.Path(file_okay=False),
              help="With --run: where samples go (default: <run>/generated/<ckpt>-<settings>); rerun to resume.")
@click.option("--sample-batch-size", type=click.IntRange(1), default=64, show_default=True,
              help="With --run: images per sampling forward pass (does not change the images).")
@click.option("--solver", help="With --run: override the preset's solver.")
@click.option("--steps", type=click.IntRange(1), help="With --run: override the preset's number of steps.")
@click.option("--cfg-scale", type=click.FloatRange(0), help="With --run: override the preset's guidance scale.")
@click.option("--set", "sets", multiple=True, metavar="KEY=VALUE",
              help="Deprecated alias of a positional KEY=VALUE override (with --run).")
@click.option("--no-progress", is_flag=True, help="No progress bars on stderr.")
@click.option("--modality", type=click.Choice(["image", "audio"]), default="image", show_default=True,
              help="audio: Fréchet audio distance (FAD) of folders of audio files, embedded by --features.")
@click.option("--features", type=click.Path(file_okay=False),
              help="With --modality audio: a trained A-JEPA run (or checkpoint) whose target encoder embeds the audio.")
def command(inputs, extractor, mode, weights_dir, out, save_stats, cache_dir, no_cache, kid, kid_subsets,
            kid_subset_size, seed, batch_size, workers, device, run_dir, num, samples_dir, sample_batch_size, sets,
            no_progress, modality, features, **shortcuts):
    """FID and KID of GEN against REF, as clean-fid computes them, on a machine without internet.

    \b
    GEN and REF are each one of:
      a folder of images   read as clean-fid reads it (recursive, PIL, RGB)
      an .npz batch        arr_0: uint8 N x H x W x C (the ADM/DiT sample convention)
      a statistics file    .npz with mu, sigma (from --save-stats, clean-fid, or an ADM reference batch)

    \b
    Examples:
      ditk evaluate-fid samples/ ref.npz --weights-dir /models/fid
      ditk evaluate-fid samples.npz VIRTUAL_imagenet256_labeled.npz --mode legacy_tensorflow --weights-dir W
      ditk evaluate-fid --run runs/digits-dit --num 1000
      ditk evaluate-fid data/ref/ --save-stats ref-stats.npz --weights-dir W
      ditk evaluate-fid --modality audio gen_wavs/ ref_wavs/ --features runs/a-jepa-tiny

    Prints one JSON object on stdout (fid, kid_mean, kid_std, n_gen, n_ref, mode, feature_extractor,
    weights_sha256, seconds, ...); progress goes to stderr. With one input and --save-stats, writes that
    input's statistics instead.

    \b
    Protocol: clean-fid's, unchanged. --mode clean: PIL bicubic resize to 299x299 in float (default);
    legacy_tensorflow: resize inside the network, as TensorFlow FID and the ADM evaluator (use it with the
    ADM reference batches for DiT-paper numbers; ditk refuses ADM statistics in the other modes);
    legacy_pytorch: pytorch-fid's. Extractor digits: PIL box resize to 8x8, grayscale. Every image of one
    set must share one resolution and channel count (GEN and REF may differ in resolution).

    \b
    Offline: Inception weights are read from --weights-dir or $DITK_WEIGHTS_DIR and checked by sha256,
    never downloaded: clean/legacy_tensorflow need inception-2015-12-05.pt, legacy_pytorch needs
    pt_inception-2015-12-05-6726825d.pth; the error for a missing file says where to get it. The digits
    extractor ships with ditk. Reference statistics are cached by (data set, resolution, mode, extractor).

    \b
    --run RUN --num N samples N images (classes uniform, none for an unconditional run; the preset's
    solver and guidance unless --solver/--steps/--cfg-scale or KEY=VALUE overrides such as sample.solver=ddim
    change them; resumable) and compares them with the run's training data set, or with REF if given.

    \b
    --modality audio: GEN and REF are folders of audio files (wav, flac, ogg, ...) or statistics files; each
    file is resampled to the --features run's rate, cut into windows of its training length and embedded
    by its A-JEPA target encoder (one observation per window); prints fad (and KID on the same embeddings).

    Not implemented yet: sFID, Inception Score, precision/recall (the ADM evaluator reports them).

    Exit codes: 0 ok, 2 bad input (one line on stderr), 1 unexpected failure.
    """
    import time

    from pathlib import Path

    from ditk.errors import DitkError

    # KEY=VALUE overrides are positional, as in every ditk command (an existing path with '=' stays an input).
    sets = [*(a for a in inputs if "=" in a and not Path(a).exists()), *sets]
    inputs = [a for a in inputs if not ("=" in a and not Path(a).exists())]
    progress = not no_progress
    if modality == "audio":
        given = [name for name, used in (("--run", run_dir), ("--num", num), ("--samples-dir", samples_dir),
                                         ("KEY=VALUE", sets), ("--extractor", extractor != "auto"),
                                         ("--mode", mode != "clean"), ("--weights-dir", weights_dir),
                                         ("--workers", workers is not None))
                 if used] + [f"--{k.replace('_', '-')}" for k, v in shortcuts.items() if v is not None]
        if given:
            raise DitkError(f"{', '.join(given)} only apply to images: with --modality audio pass GEN and REF folders "
                            f"of audio files and --features RUN (an A-JEPA run)")
        if len(inputs) not in (1, 2) or (len(inputs) == 1 and not save_stats):
            raise DitkError("pass GEN and REF (folders of audio files or statistics files), or one input with "
                            "--save-stats to write its statistics")
        import torch

        from ditk.metrics import audio

        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        options = dict(device=device, batch_size=batch_size, progress=progress)
        if len(inputs) == 1:
            result = audio.compute_stats(inputs[0], features, save_stats, **options)
        else:
            result = audio.evaluate(inputs[0], inputs[1], features, cache_dir=cache_dir, use_cache=not no_cache,
                                    save_stats=save_stats, kid=kid, kid_subsets=kid_subsets,
                                    kid_subset_size=kid_subset_size, seed=seed, **options)
        if out:
            from ditk.atomic import write_text

            write_text(out, json.dumps(result, indent=2) + "\n")
        click.echo(json.dumps(result))
        return
    if features is not None:
        raise DitkError("--features applies to --modality audio; images are embedded by --extractor")
    if run_dir is None:
        if num is not None or samples_dir is not None or sets or any(v is not None for v in shortcuts.values()):
            raise DitkError("--num, --samples-dir, --solver, --steps, --cfg-scale and KEY=VALUE overrides only apply "
                            "with --run RUN")
        if len(inputs) == 1 and not save_stats:
            raise DitkError("one input given: pass GEN and REF, or one input with --save-stats to write its statistics")
        if len(inputs) not in (1, 2):
            raise DitkError("pass GEN and REF (folders, .npz batches or statistics files), or --run RUN --num N")
    else:
        if num is None:
            raise DitkError("--run needs --num N (how many images to sample; FID-50K uses 50000)")
        if len(inputs) > 1:
            raise DitkError("with --run, GEN is the run's samples: pass at most one REF")

    import torch

    from ditk.metrics import fid as fid_lib
    from ditk.metrics.extractors import ExtractorHandle

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    elif device.startswith("cuda") and not torch.cuda.is_available():
        raise DitkError("--device cuda was asked for but no CUDA device is visible: use --device cpu")
    if extractor == "auto":
        extractor = "inception"
        if run_dir is not None:
            from ditk.metrics.from_run import data_name

            extractor = {"digits": "digits", "photos": "photos"}.get(data_name(run_dir), "inception")
    handle = ExtractorHandle(extractor, mode=mode, weights_dir=weights_dir, device=device)
    options = dict(batch_size=batch_size, num_workers=workers, progress=progress)

    if run_dir is None and len(inputs) == 1:
        result = fid_lib.compute_stats(inputs[0], handle, save_stats, **options)
    else:
        extra = {}
        if run_dir is not None:
            from ditk.metrics import from_run
            from ditk.metrics.inputs import load_side

            # Check the reference and the extractor's weights before spending minutes on sampling.
            ref = load_side(inputs[0], "ref") if inputs else from_run.dataset_images(run_dir)
            handle.get()
            overrides = [*sets, *(f"{SHORTCUTS[k]}={v}" for k, v in shortcuts.items() if v is not None)]
            start = time.perf_counter()
            gen = from_run.sample(run_dir, num, seed=seed, batch_size=sample_batch_size, out_dir=samples_dir,
                                  overrides=overrides, progress=progress)
            extra = {"run": str(run_dir), "num": num, "samples": str(gen),
                     "sampling_seconds": round(time.perf_counter() - start, 3)}
        else:
            gen, ref = inputs
        result = fid_lib.evaluate(gen, ref, handle, cache_dir=cache_dir, use_cache=not no_cache,
                                  save_stats=save_stats, kid=kid, kid_subsets=kid_subsets,
                                  kid_subset_size=kid_subset_size, seed=seed, **options)
        if extra:
            extra["seconds"] = round(result["seconds"] + extra["sampling_seconds"], 3)  # the whole evaluation
        result.update(extra)
    text = json.dumps(result)
    if out:
        from ditk.atomic import write_text

        write_text(out, json.dumps(result, indent=2) + "\n")
    click.echo(text)
