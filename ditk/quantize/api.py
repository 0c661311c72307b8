"""`ditk quantize`: load a source, quantize its Linear layers (real: torchao; simulated: a PTQ method over a
calibration set), write the folder (`ditk.quantize.folder`)."""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import ConfigError
from .checks import CalibSettings, check_request
from .folder import save, state_bytes
from .layers import DEFAULT_KEEP, select_linears


def log(msg: str) -> None:
    print(f"[ditk] {msg}", file=sys.stderr)


def default_out(source: str, tag: str) -> Path:
    path = Path(source)
    from ..runs import resolve_checkpoint

    if (path / "config.yaml").is_file() or (path / "state.pt").is_file():
        run_dir, _ = resolve_checkpoint(path)
        return run_dir.parent / f"{run_dir.name}-{tag}"
    return Path("runs") / f"{path.stem}-{tag}"


def quantize(source: str, *, scheme: Optional[str] = None, method: Optional[str] = None, preset: Optional[str] = None,
             overrides: Sequence[str] = (), weights: str = "ema", wbits: Optional[int] = None,
             abits: Optional[int] = None, group_size: Optional[int] = None, keep: Sequence[str] = DEFAULT_KEEP,
             options: Optional[dict] = None, calib: CalibSettings = CalibSettings(), out: Optional[str] = None,
             device: str = "auto", progress: bool = True) -> tuple[Path, dict, torch.nn.Module]:
    """Returns (output folder, manifest, the quantized model in memory)."""
    from ..generate import load_pipeline, pick_device
    from ..registry import PTQ_METHODS, QUANT_SCHEMES
    from ..runs import resolve_checkpoint

    dev = pick_device(device)
    check_request(source, scheme, method, out, calib)
    tag = scheme or f"sim-{method}" + (f"-w{wbits}" if wbits else "") + (f"a{abits}" if abits else "")
    target = Path(out) if out else default_out(source, tag)
    if target.exists():
        raise ConfigError(f"{target} already exists: pass --out NEW_FOLDER (nothing was written)")
    built = QUANT_SCHEMES.get(scheme).builder(dev, wbits, group_size) if scheme else None  # refuses before loading
    run_method = PTQ_METHODS.get(method).builder if method else None
    if run_method is not None:
        from .methods._common import merge_options

        merge_options(run_method.defaults, options, method)  # an unknown --opt is refused before loading
    elif options:
        raise ConfigError(f"--opt is for --simulate methods; --scheme {scheme} takes none")
    pipe = load_pipeline(source, preset=preset, overrides=overrides, weights=weights, device=str(dev))
    model = pipe.model
    layers, kept = select_linears(model, keep)
    if not layers:
        raise ConfigError(f"no nn.Linear layer is left to quantize once --keep {','.join(keep)} is applied: keep fewer")
    before = state_bytes(model)
    manifest = {"kind": "real" if scheme else "simulated", "source": str(source), "weights": weights,
                "excluded_layers": kept, "keep_patterns": list(keep), "torch": torch.__version__}
    start = time.perf_counter()  # the method's time; drawing the calibration set is timed apart (calibration.seconds)
    if scheme:
        from . import real

        log(f"quantizing {len(layers)} layers with torchao {real.backend_version()} {scheme}")
        real.apply(model, built, layers)
        manifest.update(backend="torchao", backend_version=real.backend_version(), scheme=scheme, method=None,
                        weight_bits=built.weight_bits, act_bits=8 if scheme.endswith("-dq") else None,
                        activations=built.activations, calibration=None,
                        layers={n: {"weight_dtype": built.weight_dtype, "bits": built.weight_bits,
                                    "group_size": built.group_size} for n in layers})
    else:
        from .calibration import calibration_set

        inputs, described = calibration_set(pipe, calib, progress=progress)
        start = time.perf_counter()
        log(f"simulating {method} on {len(layers)} layers (calibration: {len(inputs['x'])} model inputs)")
        result = run_method(model, layers, inputs, wbits=wbits, abits=abits, group_size=group_size,
                            options=dict(options or {}), log=log)
        manifest.update(backend="ditk fake-quant (simulated)", backend_version=None, scheme=None, method=method,
                        weight_bits=result["weight_bits"], act_bits=result["act_bits"],
                        note="simulated: weights and activations are fake-quantized in floating point; "
                             "no speed or memory claim (weights stored dequantized)",
                        calibration=described, layers=result["layers"], method_report=result.get("report", {}))
    manifest["seconds"] = round(time.perf_counter() - start, 3)
    manifest["size_bytes"] = {"before": before, "after": state_bytes(model)}
    step = resolve_checkpoint(source)[1].name if pipe.run_dir else "step-000000"
    save(target, pipe.cfg, model, manifest, step, parent=str(Path(source).resolve()))
    return target, manifest, model
