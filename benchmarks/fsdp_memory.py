"""Memory per GPU under `train.distributed=fsdp` (full sharding) for the large presets, measured on the meta
device: each preset is built without memory, sharded with the same `fully_shard` calls as training (per
block, then the root) over a fake process group of N ranks, and rank 0's shards are counted (FSDP2 pads
each parameter's first dimension to a multiple of N; rank 0 holds the largest shard).

Per GPU (fp32 master weights, AdamW, fp32 EMA, bf16 compute = train.mixed_precision=bf16):
  sharded state  weights 4 B + gradients 4 B + Adam m, v 8 B + EMA 4 B per parameter of the local shard
  gathered       transient full weights while they run: the root's own parameters (embedders, final layer;
                 kept gathered) in bf16, plus two blocks in bf16 (the running one and the prefetched next one),
                 plus one block's unsharded gradient in bf16 and its fp32 copy for the reduce-scatter
  activations    not counted (they depend on the batch); with train.activation_checkpointing=true each block
                 keeps only its bf16 input, printed as `ckpt inputs` for the preset's global batch / N
DDP for comparison: the whole 20 B per parameter on every GPU.

usage: python benchmarks/fsdp_memory.py [--gpus 8] [--presets a b ...] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

PRESETS = ["dit-xl-2", "dimba-g-2", "fluxmusic-giant", "dit-moe-xl-2-8e2a", "dit-moe-g-2-16e2a"]
GB = 1e9


def measure(name: str, gpus: int) -> dict:
    import torch
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from commands.presets import _no_init
    from ditk.build import build_model
    from ditk.config import resolve
    from ditk.speed import _blocks

    cfg = resolve(name, [], allow_missing=("data", "autoencoder", "distill"))
    with _no_init(), torch.device("meta"):
        model = build_model(cfg)
    blocks = _blocks(model, "fsdp")
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    block_max = max(sum(p.numel() for p in b.parameters()) for b in blocks)
    root = total - sum(p.numel() for b in blocks for p in b.parameters())
    mesh = init_device_mesh("cpu", (gpus,))
    for block in blocks:  # as ditk.fsdp.shard does (the mixed-precision policy does not change the shards)
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh, reshard_after_forward=False)
    local = sum(p.to_local().numel() for p in model.parameters())
    local_trainable = sum(p.to_local().numel() for p in model.parameters() if p.requires_grad)
    sharded = 4 * local + 4 * local_trainable + 8 * local_trainable + 4 * local
    gathered = 2 * root + 2 * 2 * block_max + (2 + 4) * block_max
    m = cfg.model
    # Image-token models (one token stream of width hidden_size through every block); others: not estimated.
    tokens = (int(m.input_size) // int(m.patch_size)) ** 2 if m.name in ("dit", "dit-moe", "dimba") else None
    per_gpu_batch = cfg.train.global_batch_size // gpus
    ckpt_inputs = 2 * per_gpu_batch * tokens * int(m.hidden_size) * len(blocks) if tokens else None
    return {"preset": name, "params": total, "trainable": trainable, "blocks": len(blocks), "block_max": block_max,
            "root": root, "gpus": gpus, "local_params": local, "sharded_gb": sharded / GB, "gathered_gb": gathered / GB,
            "fsdp_gb": (sharded + gathered) / GB, "ddp_gb": (4 * total + 12 * trainable + 4 * total) / GB,
            "per_gpu_batch": per_gpu_batch,
            "ckpt_inputs_gb": ckpt_inputs / GB if ckpt_inputs else None}


def main() -> list:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gpus", type=int, default=8, help="processes to shard over (full sharding)")
    parser.add_argument("--presets", nargs="+", default=PRESETS, help="presets to measure")
    parser.add_argument("--json", type=Path, help="also write the rows here")
    args = parser.parse_args()

    import torch.distributed as dist
    from torch.testing._internal.distributed.fake_pg import FakeStore

    # A fake process group: collectives are no-ops, which is all sharding shapes need.
    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=args.gpus)
    try:
        rows = [measure(name, args.gpus) for name in args.presets]
    finally:
        dist.destroy_process_group()
    print(f"| preset | parameters | DDP (GB/GPU) | FSDP {args.gpus} GPUs: sharded state | + gathered | = GB/GPU "
          f"| ckpt inputs at batch/GPU |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        acts = f"{r['ckpt_inputs_gb']:.1f} GB at {r['per_gpu_batch']}" if r["ckpt_inputs_gb"] else "—"
        print(f"| {r['preset']} | {r['params'] / 1e9:.2f}B | {r['ddp_gb']:.0f} | {r['sharded_gb']:.1f} "
              f"| {r['gathered_gb']:.1f} | {r['fsdp_gb']:.1f} | {acts} |")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    return rows


if __name__ == "__main__":
    main()
