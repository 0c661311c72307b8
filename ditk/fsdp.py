"""Fully sharded data parallel training: `train.distributed=fsdp` (issue #16).

Each process keeps 1/N of every parameter, of its gradient, of Adam's two moments and of the EMA copy
(FSDP2, `torch.distributed.fsdp.fully_shard`: the API accelerate's FSDP2 plugin calls). Each DiT block is
its own unit: its weights are all-gathered just before its forward (and again before its backward) and
freed after; gradients are reduce-scattered, so every process holds only its shard. The batch is split
as with DDP, so the update equals DDP's (and one process's) up to float summation order.

Why not accelerate's FSDP plugin: accelerate enables it only on accelerator back-ends (its CPU multi-process
mode ignores the plugin), so the two-process CPU test could not cover it. ditk therefore lets accelerate
set up the processes and calls `fully_shard` itself, the same code path on CPU (gloo) and CUDA (NCCL).

Checkpoints (checkpoints/step-NNNNNN/):
  sharded/                    torch.distributed.checkpoint (DCP) of model, EMA and optimizer, each process
                              writing its shard: exact resume, also onto another process count (DCP reshards)
  model.safetensors, ema.safetensors   the full weights, gathered to rank 0 at save time, so that
                              `ditk sample`, `--weights model`, `train.init_from` read an FSDP run as any other
The manifest covers the shards too. DCP writes every shard into one folder: processes on several nodes
need a shared file system for run.dir (as for any multi-node checkpoint).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

from .errors import ConfigError

SHARDINGS = ("full", "hybrid")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
SHARDED_DIR = "sharded"


def check_config(tc) -> None:
    """One-line errors for the FSDP keys, before any process group exists."""
    if tc.distributed not in ("ddp", "fsdp"):
        raise ConfigError(f"train.distributed={tc.distributed!r} is not one of ddp, fsdp: pick one of them")
    if tc.distributed != "fsdp":
        return
    if tc.fsdp_sharding not in SHARDINGS:
        raise ConfigError(f"train.fsdp_sharding={tc.fsdp_sharding!r} is not one of {', '.join(SHARDINGS)}: pick one")
    for key in ("fsdp_param_dtype", "fsdp_reduce_dtype"):
        allowed = ("auto", *DTYPES) if key == "fsdp_param_dtype" else tuple(DTYPES)
        if tc[key] not in allowed:
            raise ConfigError(f"train.{key}={tc[key]!r} is not one of {', '.join(allowed)}: pick one of them")
    if tc.mixed_precision == "fp16":
        raise ConfigError("train.distributed=fsdp with train.mixed_precision=fp16 needs a sharded loss scaler, "
                          "which ditk does not have: use train.mixed_precision=bf16")
    if str(tc.compile) in ("full", "True", "true"):
        raise ConfigError("train.compile=full compiles FSDP's hooks with the model, which ditk has not verified: "
                          "use train.compile=regional with train.distributed=fsdp (each block compiled, then sharded)")
    if tc.fsdp_shard_size < 0:
        raise ConfigError(f"train.fsdp_shard_size={tc.fsdp_shard_size} must be >= 0 (0 = processes per node): fix it")


def device_mesh(tc, device: torch.device, world: int):
    """full: one mesh dimension over every process. hybrid (HSDP): (replicas, shard) — parameters sharded
    within a group of `fsdp_shard_size` processes (one node: all-gathers stay on NVLink) and replicated across
    groups (gradients all-reduced between them, as DDP)."""
    from torch.distributed.device_mesh import init_device_mesh

    if tc.fsdp_sharding == "full":
        return init_device_mesh(device.type, (world,), mesh_dim_names=("shard",))
    shard = tc.fsdp_shard_size or int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if shard > world or world % shard:
        raise ConfigError(f"train.fsdp_shard_size={shard} does not divide the {world} processes: pick a divisor")
    return init_device_mesh(device.type, (world // shard, shard), mesh_dim_names=("replicate", "shard"))


def mixed_precision_policy(tc):
    """param_dtype: the dtype weights are all-gathered and computed in (the fp32 master shard stays fp32);
    reduce_dtype: the dtype gradients are reduced in; outputs come back as fp32 for the loss."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    name = tc.fsdp_param_dtype
    if name == "auto":
        name = "bf16" if tc.mixed_precision == "bf16" else "fp32"
    return MixedPrecisionPolicy(param_dtype=DTYPES[name], reduce_dtype=DTYPES[tc.fsdp_reduce_dtype],
                                output_dtype=torch.float32)


def shard(module: torch.nn.Module, mesh, tc, blocks, train: bool = True) -> torch.nn.Module:
    """fully_shard each block (the auto-wrap unit), then the root for what is left (embedders, final layer).
    In place: parameter names, hence state_dict keys, are unchanged."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    # The EMA copy is only read (sampling grids): no gradient reduction, fp32 weights.
    policy = mixed_precision_policy(tc) if train else MixedPrecisionPolicy()
    # Blocks hand bf16 activations to each other; only the root's output goes back to fp32 (the loss).
    inner = MixedPrecisionPolicy(param_dtype=policy.param_dtype, reduce_dtype=policy.reduce_dtype)
    for block in blocks:
        fully_shard(block, mesh=mesh, mp_policy=inner, reshard_after_forward=tc.fsdp_reshard_after_forward)
    # The root's own parameters are needed again at once by the backward: keep them gathered (FSDP2's advice).
    fully_shard(module, mesh=mesh, mp_policy=policy, reshard_after_forward=False)
    if train and policy.param_dtype == torch.bfloat16:
        # Layers outside the blocks may meet fp32 tensors the model makes itself (sinusoidal timestep features):
        # autocast runs them in bf16, as accelerate does for its FSDP mixed precision.
        forward = module.forward
        module.forward = torch.autocast(module_device(module).type, dtype=torch.bfloat16)(forward)
    return module


def module_device(module: torch.nn.Module) -> torch.device:
    p = next(module.parameters())
    return p.to_local().device if hasattr(p, "to_local") else p.device


def local(tensor: torch.Tensor) -> torch.Tensor:
    """This process's shard of a DTensor (a plain tensor is its own shard)."""
    return tensor.to_local() if hasattr(tensor, "to_local") else tensor


def full_norm(norm) -> torch.Tensor:
    """clip_grad_norm_ over sharded gradients returns a replicated DTensor: the global norm as a plain tensor."""
    return norm.full_tensor() if hasattr(norm, "full_tensor") else norm


# ---- checkpoints ----------------------------------------------------------------------------------------------
def _state(model, ema, optimizer, uses_ema: bool) -> dict:
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    state = {"model": get_model_state_dict(model), "optimizer": get_optimizer_state_dict(model, optimizer)}
    if uses_ema:
        state["ema"] = get_model_state_dict(ema)
    return state


def staging_dir(checkpoints: Path, name: str) -> Path:
    # A '.<name>.*.tmp' folder: the run-directory lock's clean_temp removes it if a save was killed.
    return checkpoints / f".{name}.sharded.tmp"


def save_sharded(folder: Path, model, ema, optimizer, uses_ema: bool, is_main: bool) -> None:
    """Every process writes its shards of model, EMA and optimizer into `folder` (DCP; rank 0 also writes the
    metadata that maps shards to tensors). Collective: every process must call it."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    if is_main:
        shutil.rmtree(folder, ignore_errors=True)  # a killed save's leftover
        folder.mkdir(parents=True)
    dist.barrier()
    dcp.save(_state(model, ema, optimizer, uses_ema), checkpoint_id=str(folder))


def load_sharded(folder: Path, model, ema, optimizer, uses_ema: bool) -> None:
    """Restore model, EMA and optimizer shards from `folder` (DCP maps saved shards onto the current ones)."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    if not (folder / ".metadata").is_file():
        raise ConfigError(f"{folder.parent} has no {SHARDED_DIR}/ training state (it was not written by "
                          f"train.distributed=fsdp): resume it with train.distributed=ddp")
    state = _state(model, ema, optimizer, uses_ema)
    dcp.load(state, checkpoint_id=str(folder))
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, optimizer, state["optimizer"])
    if uses_ema:
        set_model_state_dict(ema, state["ema"])


def full_state_dict(module) -> dict:
    """The whole state dict, gathered tensor by tensor onto rank 0's CPU ({} on the other ranks). Collective."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(module, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
