"""The one training loop: any registered model x objective x dataset x autoencoder.

Determinism: every random draw of a step (timesteps, noise, label dropout) comes from a generator seeded
by (run.seed, step) for the *global* batch, and each process takes its slice, and the data order is a
pure function of (run.seed, step). So a run resumed from a checkpoint continues exactly as an
uninterrupted one, and N processes compute the same update as one process with the same global batch.
"""

from __future__ import annotations

import copy
import math
import signal
import sys
import time
from contextlib import nullcontext
from pathlib import Path

import torch
from omegaconf import DictConfig

from .build import (build_autoencoder, build_conditioner, build_dataset, build_model, build_objective,
                    check_model_data, check_model_objective, latent_shape)
from .config import section_obj, to_yaml
from .errors import EXIT_INTERRUPTED, EXIT_OK, EXIT_PREEMPTED, ConfigError, RunFailed
from .runs import RunDir, checkpoint_name, is_main_rank, load_state, load_weights, save_checkpoint, save_json
from .speed import (_blocks, apply_model_levers, build_optimizer, optimizer_flags, restore_optimizer_flags,
                    set_matmul_precision, set_threads, update_ema)  # noqa: F401  (update_ema: re-exported, tests and distill import it from here)
from .atomic import write_text


def log(msg: str) -> None:
    print(f"[ditk] {msg}", file=sys.stderr, flush=True)


def step_generator(seed: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + step) % (2**63))


def mix_conditions(cond: dict, uncond: dict, drop: torch.Tensor) -> dict:
    """Per-sample choice between conditional and null conditioning (label dropout for CFG training)."""
    out = {}
    for key, value in cond.items():
        mask = drop.view(-1, *([1] * (value.dim() - 1))).to(value.device)
        out[key] = torch.where(mask, uncond[key].to(value.device), value)
    return out


def auxiliary_loss(model: torch.nn.Module):
    """Sum of the `aux_loss` tensors that modules set during the last forward (e.g. an MoE balance loss),
    or None. A module opts in by assigning `self.aux_loss` in its forward; the loop adds it to the loss."""
    terms = [m.aux_loss for m in model.modules() if isinstance(getattr(m, "aux_loss", None), torch.Tensor)]
    return sum(terms) if terms else None


class Preemption:
    """SIGTERM / SIGUSR1 (Slurm's pre-emption and time-limit signals) and SIGINT (Ctrl-C) ask the loop to
    checkpoint at the end of the current step and stop: exit 75 (requeue me) or 130 (interrupted). A second
    Ctrl-C stops at once without saving. `restore()` puts the previous handlers back."""

    SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)

    def __init__(self):
        self.signum = None
        self._previous = {sig: signal.signal(sig, self._handler) for sig in self.SIGNALS}

    def _handler(self, signum, frame):
        self.signum = signum
        if signum == signal.SIGINT:
            signal.signal(signal.SIGINT, signal.default_int_handler)  # a second Ctrl-C: KeyboardInterrupt now
            log("interrupted: saving a checkpoint at the end of this step (Ctrl-C again to stop without saving)")

    @property
    def exit_code(self) -> int:
        return EXIT_INTERRUPTED if self.signum == signal.SIGINT else EXIT_PREEMPTED

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)


def _rng_state() -> dict:
    return {"torch": torch.get_rng_state()}


def _build_data(cfg: DictConfig, run: RunDir, autoencoder, device, accelerator, model):
    """The dataset the loop reads and the encoder it applies on the fly: the autoencoder itself, or with
    train.precompute_latents a cache of its posteriors (ditk.data.latent_cache) and a fresh draw per step. Refuses
    first a model that does not fit the data."""
    dataset = build_dataset(cfg)
    # a model that cannot take these latents is refused now, not after encoding the whole data set
    check_model_data(model, tuple(dataset.shape), autoencoder.latent_channels(dataset.shape[0]),
                     autoencoder.downsample, dataset.num_classes)
    if cfg.train.precompute_latents and cfg.autoencoder.name != "identity":
        from omegaconf import OmegaConf

        from .data import latent_cache
        from .data.latents import ST_DTYPES, PosteriorDraw
        from .registry import DATASETS

        if cfg.train.latents_dtype not in ST_DTYPES:
            raise ConfigError(f"train.latents_dtype={cfg.train.latents_dtype} is not one of {', '.join(ST_DTYPES)}")
        if hasattr(dataset, "set_epoch") and not hasattr(dataset, "load"):
            raise ConfigError(f"data set {cfg.data.name} changes its items from epoch to epoch (crops, captions), "
                              "which a one-time encode would freeze: set train.precompute_latents=false")
        flips = bool(getattr(dataset, "hflip", False))
        key = latent_cache.cache_key(OmegaConf.to_container(cfg.data, resolve=True),
                                     OmegaConf.to_container(cfg.autoencoder, resolve=True), dataset, autoencoder,
                                     cfg.train.latents_dtype, flips)
        manifest = latent_cache.prepare(
            latent_cache.cache_folder(cfg, run.path), key, dataset, autoencoder, rank=accelerator.process_index,
            world=accelerator.num_processes, device=device, dtype=cfg.train.latents_dtype, flips=flips,
            num_workers=cfg.train.num_workers, nonce=latent_cache.launch_nonce(), barrier=accelerator.wait_for_everyone)
        latent_cfg = DATASETS.get("latents").config(path=str(manifest), hflip=flips,
                                                    flip_seed=int(getattr(dataset, "flip_seed", 0)))
        dataset = DATASETS.build("latents", latent_cfg)
        return dataset, PosteriorDraw(autoencoder, accelerator.process_index, accelerator.num_processes)
    if hasattr(autoencoder, "posterior"):  # a VAE, encoding every batch: the same draws as from the cache
        from .data.latents import EncodeAndDraw

        return dataset, EncodeAndDraw(autoencoder, accelerator.process_index, accelerator.num_processes)
    return dataset, autoencoder


def train(cfg: DictConfig, run_path: Path, progress: bool = True) -> int:
    """Train (or resume) the run at `run_path`. Returns an exit code (0, EXIT_PREEMPTED or EXIT_INTERRUPTED).
    Raises RunFailed (exit 1) when a step's loss or gradient norm is not finite (see train.skip_nonfinite)."""
    preempt = Preemption()
    try:
        return _train(cfg, run_path, progress, preempt)
    finally:
        preempt.restore()


def _train(cfg: DictConfig, run_path: Path, progress: bool, preempt: Preemption) -> int:
    from accelerate import Accelerator
    from diffusers.optimization import get_scheduler
    from tqdm import tqdm

    from .data.sampler import ResumableBatchSampler

    tc = cfg.train
    set_threads(cfg)
    if set_matmul_precision(cfg) != "highest":  # before train.allow_tf32, which turns TF32 on for CUDA on top of it
        log(f"fp32 matmul precision: {cfg.runtime.matmul_precision} (torch.set_float32_matmul_precision)")
    from . import fsdp

    fsdp.check_config(tc)
    # cpu=True without a GPU: accelerate then sets up multi-process CPU training (gloo) under torchrun.
    accelerator = Accelerator(mixed_precision=tc.mixed_precision, gradient_accumulation_steps=tc.grad_accum_steps,
                              cpu=not torch.cuda.is_available())
    device, rank, world = accelerator.device, accelerator.process_index, accelerator.num_processes
    if tc.global_batch_size % (world * tc.grad_accum_steps):
        raise ConfigError(
            f"train.global_batch_size={tc.global_batch_size} is not divisible by processes x grad_accum_steps = "
            f"{world} x {tc.grad_accum_steps}: change one of them"
        )
    micro = tc.global_batch_size // (world * tc.grad_accum_steps)
    sharded = tc.distributed == "fsdp"  # parameters, gradients, Adam state and EMA sharded over the processes
    if sharded and world < 2:
        raise ConfigError("train.distributed=fsdp shards over several processes but this is one: launch it with "
                          "torchrun --nproc_per_node N -m ditk train ..., or set train.distributed=ddp")
    if tc.allow_tf32 and torch.cuda.is_available():
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True

    run = RunDir(run_path)
    ckpt = run.latest_checkpoint(say=accelerator.is_main_process)  # verified; falls back past a damaged one
    log(f"{world} process(es) on {device}, {micro} images per micro-batch, mixed precision: {tc.mixed_precision}"
        + (f", FSDP ({tc.fsdp_sharding} sharding)" if sharded else ""))

    torch.manual_seed(cfg.run.seed)  # identical initial weights on every process
    model = build_model(cfg)
    objective = build_objective(cfg)
    check_model_objective(model, objective, cfg)
    if "distill" in cfg:  # `ditk distill`: the method wraps the teacher's objective (ditk.distill)
        from .distill import build_method

        objective = build_method(cfg, objective)
    autoencoder = build_autoencoder(cfg).to(device)
    dataset, encoder = _build_data(cfg, run, autoencoder, device, accelerator, model)  # checks model vs data
    class_names = list(getattr(dataset, "class_names", None) or [])
    conditioner = build_conditioner(cfg, dataset.num_classes, class_names or None, model=model)
    if getattr(conditioner, "unconditional", False):  # model.num_classes=0: labels unused, nothing to drop
        class_names = []
        if objective.solvers:  # refuse guidance settings now rather than at the first sample grid
            conditioner.check_sample_settings(cfg.sample)
    if accelerator.is_main_process and class_names:
        save_json(run.path / "classes.json", class_names)  # lets `ditk sample --class-labels seven` work
    if tc.init_from and ckpt is None:  # a fresh run starts there; a resumed one from its checkpoint
        from .models.convert import load_initial_weights

        load_initial_weights(model, tc.init_from)
        log(f"initial weights from {tc.init_from}")
    # An objective whose model keeps its own average (A-JEPA's target encoder) sets `uses_ema = False`: no EMA
    # copy is kept or updated, and the checkpoint's ema.safetensors holds the model's weights.
    uses_ema = getattr(objective, "uses_ema", True)
    ema = copy.deepcopy(model).requires_grad_(False).eval() if uses_ema else model
    if hasattr(objective, "attach"):  # a distillation method (ditk.distill): loads its frozen teacher, sees the EMA
        objective.attach(ema=ema, conditioner=conditioner, device=device, run_dir=run.path)

    if sharded:  # before the optimizer: sharding replaces the parameters by their shards
        for lever in apply_model_levers(model, tc):  # per block, before sharding (as torchtitan orders them)
            log(lever)
        mesh = fsdp.device_mesh(tc, device, world)
        blocks = _blocks(model, "train.distributed=fsdp")
        fsdp.shard(model, mesh, tc, blocks)
        if uses_ema:
            fsdp.shard(ema, mesh, tc, _blocks(ema, "train.distributed=fsdp"), train=False)
    optimizer = build_optimizer([p for p in model.parameters() if p.requires_grad], cfg.optim, device)
    lr_scheduler = get_scheduler(cfg.optim.schedule, optimizer, num_warmup_steps=cfg.optim.warmup_steps,
                                 num_training_steps=tc.max_steps)

    start_step, state = 0, {}
    if ckpt is not None:
        from .models.convert import load_state_dict_checked

        state = load_state(ckpt)
        if sharded:  # each process reads its shards of model, EMA and optimizer
            fsdp.load_sharded(ckpt / fsdp.SHARDED_DIR, model, ema, optimizer, uses_ema)
        else:
            # A config.yaml edited since (another depth, width, ...) is one line naming the key, not a traceback.
            load_state_dict_checked(model, load_weights(ckpt, "model"), str(ckpt / "model.safetensors"))
            if uses_ema:
                load_state_dict_checked(ema, load_weights(ckpt, "ema"), str(ckpt / "ema.safetensors"))
            optimizer.load_state_dict(state["optimizer"])
        restore_optimizer_flags(optimizer, optimizer_flags(cfg.optim.impl, device))
        lr_scheduler.load_state_dict(state["lr_scheduler"])
        if "objective" in state:  # an objective's own training state (e.g. progressive distillation's round teacher)
            objective.load_state_dict(state["objective"])
        start_step = int(state["step"])
        log(f"resuming {run.path} from {ckpt.name}")
    if accelerator.is_main_process:  # drop records logged after the checkpoint (or all, if there is none)
        run.truncate_metrics(start_step)
    if not sharded:
        ema.to(device)
        for lever in apply_model_levers(model, tc):  # after the EMA copy: the levers are the trained model's only
            log(lever)
        model, optimizer = accelerator.prepare(model, optimizer)
    raw_model = accelerator.unwrap_model(model)

    sampler = ResumableBatchSampler(len(dataset), tc.global_batch_size, cfg.run.seed, start_step=start_step,
                                    rank=rank, world_size=world, with_epoch=hasattr(dataset, "set_epoch"))
    # The loader's own generator: iter(loader) draws its workers' base seed from it, not from the global RNG.
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=sampler, num_workers=tc.num_workers,
                                         pin_memory=device.type == "cuda", persistent_workers=tc.num_workers > 0,
                                         generator=torch.Generator().manual_seed(cfg.run.seed))
    batches = iter(loader)
    if state:  # the global RNG last, once nothing else will draw from it before the first step
        torch.set_rng_state(state["rng"]["torch"])
    # The noise drawn per item: the model's input shape, unless the objective needs another (Diffusion-LM: two draws).
    input_shape = objective.noise_shape(raw_model) if hasattr(objective, "noise_shape") else latent_shape(raw_model)
    drop_p = float(getattr(cfg.model, "class_dropout_prob", 0.0))

    def save(step: int) -> None:
        folders = {}
        if sharded:  # collective: every process writes its shards, then the full weights are gathered to rank 0
            staged = fsdp.staging_dir(run.checkpoints, checkpoint_name(step))
            fsdp.save_sharded(staged, model, ema, optimizer, uses_ema, accelerator.is_main_process)
            folders = {fsdp.SHARDED_DIR: staged}
            model_sd = fsdp.full_state_dict(model)
            ema_sd = fsdp.full_state_dict(ema) if uses_ema else model_sd
        if accelerator.is_main_process:
            state = {"step": step, "lr_scheduler": lr_scheduler.state_dict(),
                     "rng": _rng_state(), "data": {"seed": cfg.run.seed, "global_batch_size": tc.global_batch_size},
                     # the running-loss window, so the first record after a resume equals the uninterrupted run's
                     "log_window": {"loss_sum": window_loss, "steps": window_steps}, "nonfinite_skipped": skipped}
            if not sharded:
                state["optimizer"] = optimizer.state_dict()
                model_sd, ema_sd = raw_model.state_dict(), ema.state_dict()
            if hasattr(objective, "state_dict"):
                state["objective"] = objective.state_dict()
            path = save_checkpoint(run, step, model_sd, ema_sd, state, tc.keep_last,
                                   files={"run-config.yaml": to_yaml(cfg)}, folders=folders)
            log(f"saved {path}")
        accelerator.wait_for_everyone()

    def sample_grid(step: int) -> None:
        # A sharded EMA's forward is collective: under FSDP every process samples the grid, rank 0 keeps it.
        if (accelerator.is_main_process or sharded) and objective.solvers:  # A-JEPA (no solvers) samples nothing
            import tempfile

            from .generate import Pipeline, write_training_grid

            pipe = Pipeline(cfg, ema, objective, autoencoder, conditioner, device)
            name = f"step-{step:06d}.png"
            if accelerator.is_main_process:
                write_training_grid(pipe, run.samples / name)
            else:
                with tempfile.TemporaryDirectory() as scratch:
                    write_training_grid(pipe, Path(scratch) / name)
        accelerator.wait_for_everyone()

    step = start_step
    bar = tqdm(total=tc.max_steps, initial=step, disable=not (progress and accelerator.is_main_process),
               desc="train", file=sys.stderr, dynamic_ncols=True)
    window_loss, window_steps, window_start = 0.0, 0, time.perf_counter()
    data_wait = 0.0  # seconds this process waited in next(batches) since the last record
    timed_steps = 0  # steps run by this process since the last record (the speed; the window may predate a resume)
    window_loss = float(state.get("log_window", {}).get("loss_sum", 0.0))
    window_steps = int(state.get("log_window", {}).get("steps", 0))
    skipped = int(state.get("nonfinite_skipped", 0))
    model.train()
    while step < tc.max_steps:
        t_wait = time.perf_counter()
        images, labels = next(batches)
        data_wait += time.perf_counter() - t_wait
        gen = step_generator(cfg.run.seed, step)
        if hasattr(objective, "begin_step"):  # objectives with a schedule over training (A-JEPA's mask curriculum)
            objective.begin_step(raw_model, step, tc.max_steps)
        t_all = objective.sample_time(tc.global_batch_size, gen)
        # An objective that uses no noise (A-JEPA: `uses_noise = False`) draws none; it draws its own t first.
        noise_all = torch.randn((tc.global_batch_size, *input_shape), generator=gen) \
            if getattr(objective, "uses_noise", True) else None
        drop_all = torch.rand(tc.global_batch_size, generator=gen) < drop_p
        mine = slice(rank, None, world)  # the same positions the sampler gave this process
        t, drop = t_all[mine].to(device), drop_all[mine]
        noise = noise_all[mine].to(device) if noise_all is not None else None
        with torch.no_grad():
            x0 = encoder.encode(images.to(device), generator=gen)
        labels = labels.to(device)
        cond = mix_conditions(conditioner.cond(labels), conditioner.uncond(len(labels)), drop)

        step_loss = 0.0
        for i in range(tc.grad_accum_steps):
            part = slice(i * micro, (i + 1) * micro)
            sync = i == tc.grad_accum_steps - 1
            with nullcontext() if sync else accelerator.no_sync(model):
                losses = objective.training_losses(model, x0[part], t[part], None if noise is None else noise[part],
                                                   {k: v[part] for k, v in cond.items()})
                loss = losses["loss"].mean()
                aux = auxiliary_loss(raw_model)
                if aux is not None:
                    loss = loss + aux
                accelerator.backward(loss)
            step_loss += loss.detach().float() / tc.grad_accum_steps
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), tc.grad_clip if tc.grad_clip > 0 else math.inf)
        grad_norm = fsdp.full_norm(grad_norm)  # sharded gradients: a DTensor holding the global norm
        # The same on every process: the loss is averaged over them and the gradient norm is global.
        loss_value = accelerator.reduce(step_loss.to(device), "mean").item()
        # fp16: an inf gradient norm is the loss scaler's business (it skips that step and lowers the scale)
        finite = math.isfinite(loss_value) and (tc.mixed_precision == "fp16" or math.isfinite(float(grad_norm)))
        if not finite:
            if skipped >= tc.skip_nonfinite:
                bar.close()
                last = run.latest_checkpoint() if accelerator.is_main_process else None
                raise RunFailed(
                    f"step {step + 1}: loss {loss_value}, gradient norm {float(grad_norm)} (not finite): stopped "
                    f"without saving this step; the last checkpoint is {last.name if last else 'none'}. Lower optim.lr, "
                    f"set train.grad_clip, or let ditk skip such steps with train.skip_nonfinite=N")
            skipped += 1
            log(f"step {step + 1}: loss {loss_value}, gradient norm {float(grad_norm)}: step skipped "
                f"({skipped} of at most train.skip_nonfinite={tc.skip_nonfinite})")
            optimizer.zero_grad(set_to_none=True)
        else:
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        lr_scheduler.step()  # the schedule is a function of the step, skipped or not
        decay = min(tc.ema_decay, (1 + step) / (10 + step)) if tc.ema_warmup else tc.ema_decay
        if uses_ema and finite:
            update_ema(ema, raw_model, decay)
        if hasattr(objective, "end_step"):  # e.g. A-JEPA's momentum update of its target encoder
            objective.end_step(raw_model, step, tc.max_steps)
        step += 1
        timed_steps += 1
        bar.update(1)

        if finite:
            window_loss += loss_value
            window_steps += 1
        if step % tc.log_every == 0 or step == tc.max_steps:
            elapsed = time.perf_counter() - window_start
            record = {"step": step, "loss": window_loss / window_steps if window_steps else None,  # None: all skipped
                      "lr": lr_scheduler.get_last_lr()[0],
                      "grad_norm": float(grad_norm), "images_per_sec": timed_steps * tc.global_batch_size / elapsed,
                      "data_wait_s": data_wait}
            if tc.skip_nonfinite:
                record["skipped_steps"] = skipped
            if accelerator.is_main_process:
                run.append_metrics(record)
            bar.set_postfix(loss=f"{record['loss']:.4f}" if record["loss"] is not None else "skipped")
            window_loss, window_steps, window_start, timed_steps, data_wait = 0.0, 0, time.perf_counter(), 0, 0.0

        stop = torch.tensor(float(preempt.signum is not None), device=device)
        stop = accelerator.reduce(stop, "sum").item() > 0  # every process stops at the same step
        if step % tc.ckpt_every == 0 or step == tc.max_steps or stop:
            save(step)
        if stop:
            bar.close()
            what = "interrupted" if preempt.exit_code == EXIT_INTERRUPTED else "pre-empted"
            log(f"{what} at step {step}: checkpoint saved; rerun the same command to resume (exit {preempt.exit_code})")
            return preempt.exit_code
        if tc.sample_every and step % tc.sample_every == 0 and step != tc.max_steps:
            sample_grid(step)
    bar.close()
    sample_grid(step)
    accelerator.end_training()
    return EXIT_OK


def train_in_run_dir(cfg: DictConfig, path: Path, resume: bool | None, progress: bool = True,
                     parent: str | None = None) -> int:
    """What `ditk train` and `ditk distill` do: own the run directory (one process group at a time), create or
    check it, train. A run that fails before its first step (a bad data.path, ...) leaves nothing behind to block
    the corrected command (one with steps but no checkpoint is started afresh by prepare_run_dir)."""
    import shutil

    from .runs import is_main_rank

    if (path / "quantization.json").is_file():
        raise ConfigError(f"{path} is a `ditk quantize` output (quantized weights, no training state): train or "
                          "fine-tune its source run (named in its lineage.json), then quantize again")
    run = RunDir(path)
    created = not path.exists()
    top = path  # the outermost folder this command creates (runs/ on a first run)
    while not top.parent.exists() and top.parent != top.parent.parent:
        top = top.parent
    with run.lock():
        try:
            cfg = prepare_run_dir(cfg, path, resume, parent=parent)
            return train(cfg, path, progress=progress)
        except BaseException:
            if created and is_main_rank() and not run.list_checkpoints() and not run.metrics.is_file() \
                    and not any((path / "latents").glob("*/shard-*.json")):  # encoded latent shards: kept for the rerun
                shutil.rmtree(path, ignore_errors=True)
                for folder in path.parents:  # and the parents it made, if still empty
                    if folder == top.parent:
                        break
                    try:
                        folder.rmdir()
                    except OSError:
                        break
            raise


# Keys that may change when a run is resumed (they do not change what is computed at a given step; run.dir and
# run.name change when a run directory is moved or copied).
RESUMABLE_KEYS = {"run.dir", "run.name", "train.max_steps", "train.log_every", "train.ckpt_every", "train.sample_every",
                  "train.keep_last", "train.num_workers", "train.skip_nonfinite", "sample",
                  # speed levers: the same step, other kernels (ditk.speed)
                  "train.compile", "train.activation_checkpointing", "optim.impl", "runtime",
                  "train.fsdp_reshard_after_forward",  # FSDP: when weights are gathered again, not what is computed
                  # the latent cache: where it lives (it is keyed by what it holds), and whether the step draws
                  # from it or encodes the pixels (the same draw, to the encoder's float rounding; ditk.data.latents)
                  "train.latents_dir", "train.precompute_latents"}


def prepare_run_dir(cfg: DictConfig, run_path: Path, resume: bool | None, parent: str | None = None) -> DictConfig:
    """Create the run dir, or check that an existing one may be resumed with this config. `parent`: the run this
    one derives from (a distilled student's teacher), recorded in lineage.json.

    A run directory without a checkpoint (a command that failed or was killed before its first checkpoint)
    holds nothing to resume: it is started afresh with the new config rather than blocking it.
    Returns the config to train with: on resume, the saved config updated with the resumable keys.
    """
    from omegaconf import OmegaConf

    run = RunDir(run_path)
    write = is_main_rank()  # under torchrun rank 0 writes; the other ranks only check
    if run.config.is_file() and run.list_checkpoints():
        if resume is False:
            raise ConfigError(f"run directory {run_path} already exists: resume it (drop --no-resume), or set run.name=<new name>")
        run.latest_checkpoint(say=False)  # none verifies: one line now, before anything (config.yaml) is rewritten
        from .config import load_run_config, read_config_file

        try:  # a key added to a schema since the run was made reads as its default, i.e. what the run was made with
            saved = OmegaConf.to_container(load_run_config(run_path))
        except ConfigError:
            saved = OmegaConf.to_container(read_config_file(run.config))  # damaged: one line naming the file
        new = OmegaConf.to_container(cfg)
        for section in new:
            for key in set(new[section]) | set(saved.get(section, {})):
                a, b = saved.get(section, {}).get(key), new[section].get(key)
                if a != b and f"{section}.{key}" not in RESUMABLE_KEYS and section not in RESUMABLE_KEYS:
                    raise ConfigError(
                        f"run {run_path} was created with {section}.{key}={a!r}, not {b!r}: "
                        f"set run.name=<new name> for a new run, or pass {section}.{key}={a!r} to resume it"
                    )
        if write:
            write_text(run.config, to_yaml(cfg))
        return cfg
    if resume is True:
        raise ConfigError(f"--resume given but {run_path} has no checkpoint to resume: drop --resume to start it")
    if run.config.is_file():
        log(f"{run_path} has no checkpoint yet (an earlier start stopped before its first one): starting it afresh")
    if write:
        run.path.mkdir(parents=True, exist_ok=True)
        write_text(run.config, to_yaml(cfg))
        run.write_lineage(parent)
    return cfg
