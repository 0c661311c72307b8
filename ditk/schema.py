"""Typed schemas of the config sections that every run has (the registry-selected sections, such as
`model` or `objective`, are typed by the dataclass their registry entry declares)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional


@dataclass
class RunConfig:
    name: str = ""  # defaults to the preset's name
    dir: str = "runs"  # the run directory is <dir>/<name>
    seed: int = 0  # model init, data order, noise and timesteps all derive from it


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 0.0
    eps: float = 1e-8
    schedule: str = "constant"  # any diffusers.optimization schedule: constant, cosine, linear, ...
    warmup_steps: int = 0
    impl: str = "auto"  # AdamW kernels: auto (fused where torch has it) | fused | foreach | loop (ditk.speed)


@dataclass
class TrainConfig:
    max_steps: int = 400_000
    global_batch_size: int = 256  # summed over processes and accumulation steps
    grad_accum_steps: int = 1
    grad_clip: float = 0.0  # max global grad norm; 0 = no clipping (DiT clips nothing)
    ema_decay: float = 0.9999
    ema_warmup: bool = False  # decay min(ema_decay, (1+step)/(10+step)): useful for short runs
    mixed_precision: str = "no"  # no | bf16 (CUDA, or CPU autocast: fast with AMX / AVX512-BF16) | fp16 (GPU)
    log_every: int = 100
    ckpt_every: int = 50_000
    sample_every: int = 0  # write a sample grid every N steps (0: only at the end)
    keep_last: int = 0  # keep the N newest checkpoints (0: keep all)
    num_workers: int = 4
    # Encode the data set's VAE posteriors once (sharded over the processes) and draw a fresh latent from them at
    # every step: the step that encodes the pixels, without the encoder (ditk.data.latent_cache). The VAE presets
    # set it true; it does nothing in pixel space (autoencoder.name=identity).
    precompute_latents: bool = False
    latents_dir: str = ""  # where that cache lives ("": <run>/latents); one folder may serve several runs
    latents_dtype: str = "float32"  # stored moments: float32 (the VAE's float32 exactly) | float16 | bfloat16 (half the disk)
    allow_tf32: bool = True
    init_from: str = ""  # start a fresh run from these weights: a ditk run/checkpoint (EMA), .pt, .safetensors, diffusers folder
    compile: str = "none"  # torch.compile the model for training: none | full (= true) | regional (each block; starts faster)
    activation_checkpointing: bool = False  # recompute each block's activations in backward: memory for batch size
    skip_nonfinite: int = 0  # skip up to N steps whose loss or gradient norm is NaN/inf (0: stop at the first, exit 1)
    # Several processes (torchrun): ddp = a full replica per process | fsdp = parameters, gradients and Adam state
    # sharded over the processes (ditk.fsdp; sharded checkpoints, plus single-file weights for `ditk sample`).
    distributed: str = "ddp"
    fsdp_sharding: str = "full"  # full: shard over all processes | hybrid: shard within groups, replicate across them
    fsdp_shard_size: int = 0  # hybrid: processes per shard group (0 = LOCAL_WORLD_SIZE, i.e. the GPUs of one node)
    fsdp_param_dtype: str = "auto"  # gather/compute dtype: auto (bf16 when mixed_precision=bf16, else fp32) | fp32 | bf16
    fsdp_reduce_dtype: str = "fp32"  # gradient reduce-scatter dtype: fp32 | bf16
    fsdp_reshard_after_forward: bool = True  # free each block's gathered weights after its forward (ZeRO-3)


@dataclass
class RuntimeConfig:
    threads: int = 0  # torch's intra-op CPU threads (torch.set_num_threads); 0 = torch's default (OMP_NUM_THREADS)
    # fp32 matmuls (torch.set_float32_matmul_precision): highest (fp32) | high (TF32 on CUDA) | medium (bf16 inside,
    # on CPU too: AMX / AVX512-BF16)
    matmul_precision: str = "highest"


@dataclass
class SampleConfig:
    solver: str = "ddpm"
    steps: int = 250
    cfg_scale: float = 1.0
    cfg_channels: Optional[int] = None  # guide only the first N channels (DiT: 3); None = all
    num: int = 16
    batch_size: int = 16
    seed: int = 0
    class_labels: str = "uniform"  # uniform (i mod classes) | random | a list such as "1,7,9"
    prompt: str = ""  # text-conditioned models: one prompt for every image (overrides class_labels)
    grid_scale: int = 1  # nearest-neighbour upscaling of the grid PNG, for tiny images
    solver_options: Dict[str, Any] = field(default_factory=dict)
    cache: str = "none"  # feature-cache policy (ditk.cache): none | fora | taylorseer | delta-dit | fbc | teacache
    cache_options: Dict[str, Any] = field(default_factory=dict)  # the policy's options, e.g. {interval: 4}
    compile: bool = False  # torch.compile the units the sampler runs (blocks, or the cached sub-modules)
    cuda_graphs: bool = False  # with compile on CUDA: capture each compiled unit as a CUDA graph and replay it
    precision: str = "fp32"  # fp32 | bf16 (autocast, CUDA or CPU)
    time_shift_window: int = 0  # > 0: time-shift sampler (TS-DDIM) choosing among this many training timesteps
    time_shift_cutoff: int = 300  # ... only while the nominal timestep is above this one (the authors' default)


@dataclass
class PruneConfig:
    """`ditk prune` (ditk.prune): what to prune, how, and the recovery fine-tune (an optional section)."""
    source: str = ""  # the run (or its checkpoints/step-N folder, or an official weights file) to prune
    method: str = "score"  # score | index | random | learnable | experts | width | heads
    criterion: str = "bi"  # score: bi (Block Influence) | oracle (loss increase when the block is removed)
    keep: int = 0  # depth target: blocks to keep ...
    pattern: str = ""  # ... or N:M = keep N of every M consecutive blocks (TinyFusion 2:4 = 28 -> 14)
    keep_indices: List[int] = field(default_factory=list)  # method=index: source blocks to keep
    calib_batches: int = 8  # calibration batches for scores, FLOPs and Taylor importance
    calib_batch_size: int = 32
    seed: int = 0
    search_steps: int = 200  # learnable: steps of the Gumbel mask search (TinyFusion: 1 epoch)
    search_batch_size: int = 32
    search_lr: float = 1.0e-4  # learnable: LoRA learning rate (TinyFusion 1e-4) ...
    gate_lr_scale: float = 10.0  # ... and the mask logits learn 10x faster (TinyFusion)
    lora_rank: int = 8  # learnable: LoRA rank co-trained with the mask (0 = mask only)
    lora_alpha: float = 16.0  # LoRA scale alpha / rank (TinyFusion: alpha = 2 * rank)
    tau_start: float = 4.0  # Gumbel-softmax temperature, annealed linearly ...
    tau_end: float = 0.1  # ... to this (TinyFusion tau-range [4, 0.1])
    logit_scale: float = 100.0  # mask logits = parameter x this (TinyFusion scaling 1e2) ...
    logit_scale_end: float = 0.0  # ... annealed linearly to this when > 0 (TinyFusion --scaling-range; 0: constant)
    mask_ema_decay: float = 0.999  # learnable: the exported mask is the argmax of this EMA of the logits (TinyFusion)
    experts_keep: int = 0  # method=experts: routed experts kept per MoE layer
    experts_merge: bool = False  # method=experts: merge each dropped expert into its most similar kept one
    mlp_keep: int = 0  # method=width: MLP hidden channels kept per block
    heads_keep: int = 0  # method=heads: attention heads kept per block (on average, with heads_scope=global)
    heads_scope: str = "block"  # method=heads: block (every block its K best) | global (K x depth ranked over all)
    recover_steps: int = 0  # fine-tune the pruned model this many steps with the source as teacher (KD)
    recover_lr: float = 0.0  # 0: optim.lr x train.global_batch_size / lr_reference_batch (linear scaling)
    lr_reference_batch: int = 256  # the global batch optim.lr was tuned for


FIXED_SECTIONS = {"run": RunConfig, "optim": OptimConfig, "train": TrainConfig, "sample": SampleConfig,
                  "runtime": RuntimeConfig}
# Sections typed by a schema that only some configs have (a run made by `ditk prune` records its `prune:`
# settings; other runs have no such section).
OPTIONAL_FIXED_SECTIONS = {"prune": PruneConfig}
# section -> registry attribute name in ditk.registry
REGISTRY_SECTIONS = {
    "model": "MODELS",
    "objective": "OBJECTIVES",
    "data": "DATASETS",
    "autoencoder": "AUTOENCODERS",
    "conditioner": "CONDITIONERS",
}
DEFAULT_NAMES = {"autoencoder": "identity", "conditioner": "class"}
# Keys a registry section accepts for every entry, besides its dataclass's: section -> {key: (type, default)}.
# model.guidance_embed: the model takes the CFG scale as an input `w` (ditk.models.guidance; LCM-style students).
COMMON_KEYS = {"model": {"guidance_embed": (bool, False)}}
# Sections that only some runs have: section -> (registry attribute, the key that selects the entry). A run made by
# `ditk distill` has `distill: {method: consistency, teacher: runs/x, ...}`; a run without the section has none.
OPTIONAL_SECTIONS = {"distill": ("DISTILL_METHODS", "method")}
