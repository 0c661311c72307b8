"""Training speed levers (issue #16), each selected by a config key: the AdamW implementation (`optim.impl`),
the EMA update as one multi-tensor op, `train.compile` and `train.activation_checkpointing`.

They change how a step is computed, never what: the loop in ditk/train.py calls these and nothing else
differs. The levers that touch the model leave its parameter names (state_dict keys) unchanged, so
checkpoints, the EMA copy and `ditk sample` never see them.
"""

from __future__ import annotations

import functools
import inspect

import torch
from torch.utils.checkpoint import checkpoint

from .errors import ConfigError

OPTIM_IMPLS = ("auto", "foreach", "fused", "loop")
COMPILE_MODES = ("none", "full", "regional")
MATMUL_PRECISIONS = ("highest", "high", "medium")  # torch.set_float32_matmul_precision's values


def _fused_supported(device: torch.device) -> bool:
    return _fused_supported_on(device.type)


@functools.lru_cache(maxsize=None)
def _fused_supported_on(device_type: str) -> bool:
    # torch's fused AdamW runs on CUDA (and on CPU/MPS in recent releases); it says so by accepting `fused=True`.
    if "fused" not in inspect.signature(torch.optim.AdamW).parameters:
        return False
    if device_type == "cuda":
        return True
    try:
        p = torch.nn.Parameter(torch.zeros(1, device=device_type))
        p.grad = torch.zeros(1, device=device_type)
        torch.optim.AdamW([p], fused=True).step()
        return True
    except (RuntimeError, ValueError):
        return False


def optimizer_flags(impl: str, device: torch.device) -> dict:
    """AdamW keyword arguments for `optim.impl`: `loop` = a few kernels per tensor (torch's CPU default);
    `foreach` = the same maths as multi-tensor kernels (torch's CUDA default); `fused` = one kernel per tensor
    that does the whole update (its float rounding differs from loop's by ~1 ulp); `auto` = fused wherever
    this torch has it (measured on CPU: the AdamW step of DiT-S/2 3.4x faster than loop, README Performance),
    else foreach on CUDA and loop on CPU (where foreach measured slower than loop)."""
    if impl not in OPTIM_IMPLS:
        raise ConfigError(f"optim.impl={impl!r} is not one of {', '.join(OPTIM_IMPLS)}: pick one of them")
    if impl == "auto":
        impl = "fused" if _fused_supported(device) else "foreach" if device.type == "cuda" else "loop"
    if impl == "fused" and not _fused_supported(device):
        raise ConfigError(f"optim.impl=fused: this torch has no fused AdamW on {device.type}: use optim.impl=foreach")
    return {"foreach": impl == "foreach", "fused": impl == "fused"}


def build_optimizer(params, optim_cfg, device: torch.device) -> torch.optim.AdamW:
    return torch.optim.AdamW(params, lr=optim_cfg.lr, betas=tuple(optim_cfg.betas), weight_decay=optim_cfg.weight_decay,
                             eps=optim_cfg.eps, **optimizer_flags(optim_cfg.get("impl", "auto"), device))


def restore_optimizer_flags(optimizer: torch.optim.Optimizer, flags: dict) -> None:
    """`load_state_dict` brings back the param groups' flags as saved (a checkpoint from before `optim.impl`
    says foreach=None): the configured implementation wins. It changes the kernels, not the update."""
    for group in optimizer.param_groups:
        group.update(flags)
        if flags.get("fused"):  # fused kernels want each `step` counter on its parameter's device (a loop's is on CPU)
            for p in group["params"]:
                state = optimizer.state.get(p, {})
                if torch.is_tensor(state.get("step")):
                    state["step"] = state["step"].to(device=p.device, dtype=torch.float32)


def _local(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


@torch.no_grad()
def update_ema(ema: torch.nn.Module, model: torch.nn.Module, decay: float) -> None:
    """ema <- ema + (1 - decay) (model - ema) for every parameter, as one multi-tensor lerp per dtype
    (bit-identical to `p_ema.lerp_(p, 1 - decay)` per parameter: the same formula, fewer kernel launches)."""
    ema_params, params = [], []
    for p_ema, p in zip(ema.parameters(), model.parameters()):
        # Sharded (FSDP) parameters: each process updates its own shard (the two copies are sharded alike).
        p_ema, p = _local(p_ema), _local(p.detach())
        ema_params.append(p_ema)
        params.append(p.to(p_ema.dtype))
    if ema_params:
        torch._foreach_lerp_(ema_params, params, 1.0 - decay)


def set_threads(cfg) -> None:
    """`runtime.threads`: torch's intra-op thread count; 0 leaves torch's default (OMP_NUM_THREADS, else one per
    core). On a CPU shared with other jobs fewer threads than cores is often faster (see README Performance)."""
    threads = int(cfg.get("runtime", {}).get("threads", 0))
    if threads < 0:
        raise ConfigError(f"runtime.threads={threads} must be >= 0 (0 = torch's default): fix it")
    if threads:
        torch.set_num_threads(threads)


def set_matmul_precision(cfg) -> str:
    """`runtime.matmul_precision`: torch.set_float32_matmul_precision for fp32 matmuls. `highest` (the default,
    torch's) computes them in fp32; `medium` lets oneDNN compute fp32 matmuls and linear layers with bf16
    products and fp32 accumulation on CPUs with bf16 units (AMX / AVX512-BF16; ~1e-3 relative error per matmul,
    weights and activations stay fp32), and CUDA ones in TF32 or bf16; `high` = TF32 on CUDA (what
    train.allow_tf32 already turns on there) and fp32 on CPU. Returns the value set."""
    value = str(cfg.get("runtime", {}).get("matmul_precision", "highest"))
    if value not in MATMUL_PRECISIONS:
        raise ConfigError(f"runtime.matmul_precision={value!r} is not one of {', '.join(MATMUL_PRECISIONS)}: pick one")
    torch.set_float32_matmul_precision(value)
    return value


# -- levers on the model ----------------------------------------------------------------------------------------


class _Checkpointed:
    """Mixed into a block's class: its forward keeps no activations and is recomputed in the backward pass
    (non-reentrant: works with keyword arguments, unused inputs and torch.compile; the RNG state is replayed)."""

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return super().forward(*args, **kwargs)
        return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)


_CHECKPOINTED_CLASSES: dict = {}


def _checkpointed(block: torch.nn.Module) -> None:
    # A class swap rather than a wrapper module: parameter names stay `blocks.3.attn...` and a deepcopy of the
    # model keeps the behaviour (an instance-level forward closure would still point at the original block).
    cls = type(block)
    if issubclass(cls, _Checkpointed):
        return
    if cls not in _CHECKPOINTED_CLASSES:
        _CHECKPOINTED_CLASSES[cls] = type(f"Checkpointed{cls.__name__}", (_Checkpointed, cls), {})
    block.__class__ = _CHECKPOINTED_CLASSES[cls]


def _blocks(model: torch.nn.Module, key: str):
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, torch.nn.ModuleList) or not len(blocks):
        raise ConfigError(f"{key}: {type(model).__name__} has no `blocks` list to apply it to: turn {key} off")
    return blocks


def apply_model_levers(model: torch.nn.Module, train_cfg) -> list:
    """Activation checkpointing per block, then compilation (in place: `Module.compile` keeps the module and
    its parameter names). Returns the levers applied, for the log."""
    applied = []
    if train_cfg.get("activation_checkpointing", False):
        for block in _blocks(model, "train.activation_checkpointing"):
            _checkpointed(block)
        applied.append("activation checkpointing per block")
    mode = str(train_cfg.get("compile", "none"))
    mode = {"True": "full", "False": "none"}.get(mode, mode)  # train.compile=true/false, as sample.compile
    if mode not in COMPILE_MODES:
        raise ConfigError(f"train.compile={mode!r} is not one of {', '.join(COMPILE_MODES)}: pick one of them")
    if mode == "full":
        model.compile()
        applied.append("torch.compile (whole model)")
    elif mode == "regional":  # one compiled graph reused by every block: starts much faster than the whole model
        for block in _blocks(model, "train.compile=regional"):
            block.compile()
        applied.append("torch.compile (per block)")
    return applied
