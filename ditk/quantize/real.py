"""Real quantized models through torchao: the weights become torchao tensor subclasses (int8 / intx / float8 codes
plus scales), so the model is smaller on disk and in memory; speed depends on the device's kernels.

Each scheme is a QUANT_SCHEMES entry whose builder returns (torchao config, per-layer record) for the options.
What runs where (torchao 0.18, measured for ditk/README): int8-wo, int8-dq, intx-wo and fp8-wo run on a CPU
(fp8-wo emulated, int8-dq slow in eager mode); fp8-dq needs a CUDA GPU of compute capability >= 8.9.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import ConfigError
from ..registry import QUANT_SCHEMES


@dataclass(frozen=True)
class Scheme:
    config: object  # a torchao AOBaseConfig
    weight_bits: int
    weight_dtype: str
    group_size: Optional[int]  # None = one scale per output channel
    activations: str  # what happens to the activations at run time


def _need_sm89(device: torch.device, scheme: str) -> None:
    if device.type != "cuda" or torch.cuda.get_device_capability(device) < (8, 9):
        where = "a CPU" if device.type != "cuda" else "a GPU of compute capability %d.%d" % torch.cuda.get_device_capability(device)
        raise ConfigError(f"--scheme {scheme} needs a CUDA GPU with compute capability >= 8.9 (Ada/Hopper), not {where}: "
                          f"use --scheme fp8-wo or int8-dq")


def _no_bits(scheme: str, wbits: Optional[int], fixed: int) -> None:
    if wbits is not None and wbits != fixed:
        raise ConfigError(f"--scheme {scheme} stores {fixed}-bit weights; --wbits {wbits} is not supported: "
                          f"use --scheme intx-wo --wbits {wbits} (2-8 bits)")


@QUANT_SCHEMES.register("int8-wo", help="int8 weights (per output channel), activations in floating point")
def int8_weight_only(device, wbits=None, group_size=None):
    from torchao.quantization import Int8WeightOnlyConfig

    _no_bits("int8-wo", wbits, 8)
    return Scheme(Int8WeightOnlyConfig(), 8, "int8", None, "floating point")


@QUANT_SCHEMES.register("int8-dq", help="W8A8: int8 weights (per channel) and int8 activations (per token, dynamic)")
def int8_dynamic(device, wbits=None, group_size=None):
    from torchao.quantization import Int8DynamicActivationInt8WeightConfig

    _no_bits("int8-dq", wbits, 8)
    return Scheme(Int8DynamicActivationInt8WeightConfig(), 8, "int8", None, "int8, per token, dynamic")


@QUANT_SCHEMES.register("intx-wo", help="2-8 bit integer weights (--wbits, default 4), per group (--group-size, default 32) or per channel")
def intx_weight_only(device, wbits=None, group_size=None):
    from torchao.quantization import IntxWeightOnlyConfig
    from torchao.quantization.granularity import PerAxis, PerGroup

    bits = 4 if wbits is None else wbits
    if not 2 <= bits <= 8:
        raise ConfigError(f"--scheme intx-wo supports 2 to 8 bits, not --wbits {bits}")
    dtype = torch.int8 if bits == 8 else getattr(torch, f"int{bits}")
    group = 32 if group_size is None else group_size
    granularity = PerAxis(0) if group == 0 else PerGroup(group)
    return Scheme(IntxWeightOnlyConfig(weight_dtype=dtype, granularity=granularity), bits, f"int{bits}",
                  None if group == 0 else group, "floating point")


@QUANT_SCHEMES.register("fp8-wo", help="float8 e4m3 weights (per channel), activations in floating point (emulated on a CPU)")
def float8_weight_only(device, wbits=None, group_size=None):
    from torchao.quantization import Float8WeightOnlyConfig

    _no_bits("fp8-wo", wbits, 8)
    return Scheme(Float8WeightOnlyConfig(), 8, "float8_e4m3fn", None, "floating point")


@QUANT_SCHEMES.register("fp8-dq", help="float8 e4m3 weights and activations (per row, dynamic); CUDA compute capability >= 8.9 only")
def float8_dynamic(device, wbits=None, group_size=None):
    _need_sm89(device, "fp8-dq")
    _no_bits("fp8-dq", wbits, 8)
    from torchao.quantization import Float8DynamicActivationFloat8WeightConfig, PerRow

    return Scheme(Float8DynamicActivationFloat8WeightConfig(granularity=PerRow()), 8, "float8_e4m3fn", None,
                  "float8 e4m3, per row, dynamic")


def apply(model: torch.nn.Module, scheme: Scheme, layers: list[str]) -> None:
    """Swap the weights of `layers` (nn.Linear names) for torchao quantized tensors, in place."""
    from torchao.quantization import quantize_

    wanted = set(layers)
    if scheme.group_size:
        for name in layers:
            n_in = model.get_submodule(name).in_features
            if n_in % scheme.group_size:
                raise ConfigError(f"--group-size {scheme.group_size} does not divide {name}'s {n_in} input channels: "
                                  f"pick a divisor, or 0 for one scale per channel")
    quantize_(model, scheme.config, filter_fn=lambda module, fqn: fqn in wanted)


def backend_version() -> str:
    import torchao

    return torchao.__version__
