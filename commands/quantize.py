"""`ditk quantize SOURCE [key=value ...] --scheme S | --simulate M`: a quantized copy of a model that `ditk sample`
and `ditk evaluate-fid --run` load like any run."""

import json

import click

from ._common import complete_presets, overrides_argument

REAL = ["int8-wo", "int8-dq", "intx-wo", "fp8-wo", "fp8-dq"]
SIMULATED = ["rtn", "qdit", "svdquant", "ptq4dit", "viditq", "vq4dit", "lrqdit"]


@click.command("quantize")
@click.argument("source", type=click.Path())
@overrides_argument
@click.option("--scheme", type=click.Choice(REAL), help="A real torchao model: int8-wo (int8 weights), int8-dq (W8A8, "
              "dynamic int8 activations), intx-wo (--wbits 2-8 weights), fp8-wo, fp8-dq (CUDA compute capability >= 8.9).")
@click.option("--simulate", "method", type=click.Choice(SIMULATED), help="A simulated (fake-quant) research method: "
              "rtn (round-to-nearest baseline), qdit (GPTQ + group-size search), svdquant (smoothing + low-rank + 4-bit), "
              "ptq4dit (CSB + SSC + AdaRound block reconstruction), viditq (momentum channel balancing + dynamic per-token; "
              "below W8A8 also Hadamard rotation and per-layer mixed precision), vq4dit (k-means codebooks, "
              "layer- then block-wise calibrated, weight-only, default W2), lrqdit (twin-log weights + Hadamard rotation). Measures quality only.")
@click.option("--wbits", type=click.IntRange(2, 8), help="Weight bits (intx-wo: default 4; simulations: default 8).")
@click.option("--abits", type=click.IntRange(2, 16), help="Activation bits of a simulation (default 8; 16 = keep them in floating point).")
@click.option("--group-size", type=click.IntRange(0), help="Weights per scale along the input channels (0 = one per output channel).")
@click.option("--keep", help="Comma-separated shell patterns of Linear layers kept in high precision "
              "(default: embedders, adaLN modulation, final layer, routers; 'none' quantizes every Linear).")
@click.option("--opt", "opts", multiple=True, metavar="KEY=VALUE", help="A method option, e.g. --opt rank=32 (repeatable; see README).")
@click.option("--calib-num", type=click.IntRange(0), default=32, show_default=True, help="Simulations: images sampled for the calibration set.")
@click.option("--calib-timesteps", type=click.IntRange(0), default=8, show_default=True, help="Simulations: trajectory points kept per image.")
@click.option("--calib-seed", type=click.IntRange(0), default=1, show_default=True, help="Simulations: seed of the calibration images.")
@click.option("--preset", shell_complete=complete_presets, help="Architecture of a bare weights file (.pt, .safetensors, diffusers folder).")
@click.option("--weights", type=click.Choice(["ema", "model"]), default="ema", show_default=True, help="Which weights of a run to quantize.")
@click.option("--device", default="auto", show_default=True, help="auto, cpu, cuda, cuda:1, ...")
@click.option("--out", type=click.Path(file_okay=False), help="Output folder (default: <run>-<scheme> beside the run).")
@click.option("--no-progress", is_flag=True, help="No progress bar.")
def command(source, overrides, scheme, method, wbits, abits, group_size, keep, opts, calib_num, calib_timesteps, calib_seed,
            preset, weights, device, out, no_progress):
    """Quantize SOURCE (a run, a checkpoint, or weights + --preset) into a folder `ditk sample` loads.

    \b
    Examples:
      ditk quantize runs/digits-dit --scheme int8-wo
      ditk quantize runs/digits-dit --scheme intx-wo --wbits 4 --group-size 32
      ditk quantize runs/digits-dit --simulate qdit --wbits 4 --abits 8
      ditk sample runs/digits-dit-int8-wo

    Writes config.yaml, lineage.json, quantization.json and checkpoints/ (weights in torchao's safetensors
    format; simulated methods store fake-quantized fp32 weights). Prints the folder on stdout.
    """
    from ditk.errors import ConfigError
    from ditk.quantize.checks import DEFAULT_KEEP, CalibSettings, check_request

    options = {}
    for opt in opts:
        k, eq, v = opt.partition("=")
        if not eq or not k:
            raise ConfigError(f"--opt '{opt}' is not KEY=VALUE (e.g. --opt rank=32)")
        try:
            options[k] = json.loads(v)  # numbers, true/false, lists
        except ValueError:
            options[k] = v
    patterns = DEFAULT_KEEP if keep is None else tuple(p for p in keep.split(",") if p and p != "none")
    calib = CalibSettings(num=calib_num, timesteps=calib_timesteps, seed=calib_seed)
    check_request(source, scheme, method, out, calib)  # refuse bad input before torch is imported
    from ditk.quantize.api import quantize

    folder, manifest, _ = quantize(source, scheme=scheme, method=method, preset=preset, overrides=overrides,
                                   weights=weights, wbits=wbits, abits=abits, group_size=group_size, keep=patterns,
                                   options=options, calib=calib, out=out, device=device, progress=not no_progress)
    size = manifest["size_bytes"]
    kind = "simulated" if manifest["kind"] == "simulated" else "real"
    click.echo(f"[ditk] {kind}: {len(manifest['layers'])} layers, weights {size['before'] / 2**20:.2f} MiB -> "
               f"{size['after'] / 2**20:.2f} MiB in memory ({size['after_file'] / 2**20:.2f} MiB file), "
               f"{manifest['seconds']:.1f}s", err=True)
    click.echo(str(folder))
