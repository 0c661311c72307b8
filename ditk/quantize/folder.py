"""The folder `ditk quantize` writes: a ditk run directory (so `ditk sample` and `ditk evaluate-fid --run` take it
as they take any run) whose checkpoint holds quantized weights, plus quantization.json saying how.

out/
  config.yaml                   the source's resolved config (architecture, sampler, data set for FID)
  lineage.json                  parent (source), command line, ditk / torch / backend versions
  quantization.json             kind (real | simulated), backend + version, scheme or method, per-layer bits and
                                group sizes, excluded layers, calibration set, size before/after
  checkpoints/step-NNNNNN/      ema.safetensors: the quantized weights; state.pt: {"step", "quantized": True}
  checkpoints/latest

Real (torchao) weights are tensor subclasses; they are stored with torchao's safetensors support (codes and
scales as plain tensors, the subclass attributes as JSON in the safetensors header) and loaded back with
`load_state_dict(assign=True)`. Simulated weights are stored dequantized (fp32) with the extra buffers of
`FakeQuantLinear`; quantization.json's `layers` rebuilds those modules before loading.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .. import __version__
from ..atomic import atomic_dir
from ..config import to_yaml
from ..errors import ConfigError
from .checks import MANIFEST
from .layers import FakeQuantLinear, set_module

WEIGHTS = "ema.safetensors"
PREFIX = "model."


def state_bytes(model: torch.nn.Module) -> int:
    """Bytes of the model's weights as stored: the plain tensors behind every (quantized) parameter and buffer."""
    total = 0
    for tensor in list(model.state_dict().values()):
        parts = [getattr(tensor, n) for n in getattr(tensor, "tensor_data_names", [])]
        parts = [p for p in parts if isinstance(p, torch.Tensor)] or [tensor]
        total += sum(p.numel() * p.element_size() for p in parts)
    return total


def save(out: Path, cfg, model: torch.nn.Module, manifest: dict, step_name: str, parent: str) -> int:
    """Write the folder atomically (a failure leaves nothing behind). Returns the weights file's size in bytes."""
    from ..runs import save_json

    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if manifest["kind"] == "real":
        from torchao.prototype.safetensors.safetensors_support import flatten_tensor_state_dict

        # torchao's unflatten needs a dot in every name (it splits "module.weight"): top-level parameters such as
        # DiT's pos_embed have none, so every name is stored under a "model." prefix.
        tensors, metadata = flatten_tensor_state_dict({PREFIX + k: v for k, v in state.items()})
    else:
        tensors, metadata = state, None
    with atomic_dir(out) as tmp:
        ckpt = tmp / "checkpoints" / step_name
        ckpt.mkdir(parents=True)
        save_file(tensors, str(ckpt / WEIGHTS), metadata=metadata)
        torch.save({"step": int(step_name.split("-")[-1]), "quantized": True}, ckpt / "state.pt")
        (tmp / "checkpoints" / "latest").write_text(step_name + "\n")
        (tmp / "config.yaml").write_text(to_yaml(cfg))
        size = (ckpt / WEIGHTS).stat().st_size
        manifest["size_bytes"]["after_file"] = size
        save_json(tmp / MANIFEST, manifest)
        save_json(tmp / "lineage.json", {"command": sys.argv, "ditk_version": __version__, "parent": parent,
                                         "torch": torch.__version__, "quantization": {
                                             k: manifest.get(k) for k in ("kind", "backend", "backend_version", "scheme", "method")}})
    return size


def read_manifest(folder: Path) -> dict:
    return json.loads((Path(folder) / MANIFEST).read_text())


def load_into(model: torch.nn.Module, folder: Path, ckpt: Path) -> dict:
    """Turn a freshly built (full-precision) model into the quantized one stored in `folder`; returns the manifest."""
    manifest = read_manifest(folder)
    path = Path(ckpt) / WEIGHTS
    if manifest["kind"] == "real":
        try:
            import torchao  # noqa: F401  (registers the tensor subclasses)
            from torchao.prototype.safetensors.safetensors_support import unflatten_tensor_state_dict
        except ImportError:
            raise ConfigError(f"{folder} holds torchao-quantized weights: pip install torchao "
                              f"(it was written with torchao {manifest['backend_version']})") from None
        with safe_open(str(path), "pt") as f:
            metadata = f.metadata()
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        state, left = unflatten_tensor_state_dict(tensors, metadata)
        if left:
            raise ConfigError(f"{path} has tensors torchao cannot place ({', '.join(sorted(left)[:3])}): the file is damaged, quantize again")
        model.load_state_dict({k[len(PREFIX):]: v for k, v in state.items()}, assign=True)
    else:
        for name, spec in manifest["layers"].items():
            set_module(model, name, FakeQuantLinear(**spec["module"]))
        from safetensors.torch import load_file

        model.load_state_dict(load_file(str(path)))
    _report_on_samples(model, manifest)
    print(f"[ditk] {describe(manifest)}", file=sys.stderr)
    return manifest


def describe(manifest: dict) -> str:
    what = manifest.get("scheme") or manifest.get("method")
    if manifest["kind"] == "simulated":
        return (f"simulated quantization ({what}, W{manifest['weight_bits']}A{manifest['act_bits'] or 'fp'}): "
                f"fake-quant in floating point, no speed or memory claim")
    return f"real quantization: torchao {manifest['backend_version']} {what} ({len(manifest['layers'])} layers)"


def _report_on_samples(model: torch.nn.Module, manifest: dict) -> None:
    """`ditk sample` copies model.sampling_report() into report.json: say there what this model is."""
    previous = getattr(model, "sampling_report", None)
    summary = {"kind": manifest["kind"], "summary": describe(manifest),
               **{k: manifest.get(k) for k in ("backend", "backend_version", "scheme", "method", "weight_bits", "act_bits")}}
    model.sampling_report = lambda: {**(previous() if previous else {}), "quantization": summary}
