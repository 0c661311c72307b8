"""The steps of `ditk prune`: load the source, choose what to keep, build the smaller model, (recover), and
write it as an ordinary run directory (config.yaml with the real size, a checkpoint `ditk sample` /
`ditk evaluate-fid --run` / `ditk train` read, pruning.json, lineage.json)."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from ..atomic import atomic_dir
from ..build import build_model
from ..config import load_run_config, to_yaml
from ..errors import ConfigError
from ..runs import RunDir, checkpoint_name, resolve_checkpoint
from .layout import PRUNABLE, layout_for

DEPTH_METHODS = ("score", "index", "random", "learnable")
TEACHER = "teacher"  # a weights-file source is written as this run inside the pruned one (the recovery's teacher)
METHODS = DEPTH_METHODS + ("experts", "width", "heads")


def log(msg: str) -> None:
    print(f"[ditk] {msg}", file=sys.stderr, flush=True)


def model_section(cfg: DictConfig) -> dict:
    section = OmegaConf.to_container(cfg.model, resolve=True)
    section.pop("name", None)
    return section


def check_request(cfg: DictConfig, out: Path) -> None:
    """Everything that can be refused before any weight is read (bad input: one line, nothing written)."""
    if "prune" not in cfg or not cfg.prune.source:
        raise ConfigError("missing prune.source: set prune.source=runs/<name> (a run, one of its checkpoints, or a weights file)")
    p = cfg.prune
    if not p.source:
        raise ConfigError("missing prune.source: set prune.source=runs/<name> (a run, one of its checkpoints, or a weights file)")
    if p.method not in METHODS:
        raise ConfigError(f"unknown prune.method '{p.method}': choose one of {', '.join(METHODS)}")
    if p.method == "score" and p.criterion not in ("bi", "oracle"):
        raise ConfigError(f"unknown prune.criterion '{p.criterion}': bi (Block Influence) or oracle (loss increase)")
    name = cfg.model.name
    if p.method in DEPTH_METHODS and name not in PRUNABLE:
        raise ConfigError(f"model '{name}' has no prunable block list: depth-prune one of {', '.join(PRUNABLE)}")
    if p.method == "experts" and name != "dit-moe":
        raise ConfigError(f"prune.method=experts needs a mixture-of-experts model (dit-moe), not '{name}'")
    if p.method == "experts":
        from .experts import check_experts

        check_experts(cfg)
    if p.method == "width" and name != "dit":
        raise ConfigError(f"prune.method=width prunes the MLP channels of a dense DiT (model.name=dit), not '{name}'")
    if p.method == "heads" and name not in ("dit", "dit-moe"):
        raise ConfigError(f"prune.method=heads prunes the attention heads of DiT or DiT-MoE, not '{name}'")
    if p.method == "heads":
        from .heads import check_heads

        check_heads(cfg)
    if p.method in DEPTH_METHODS:
        from .score import index_units, target_units

        layout = layout_for(name, model_section(cfg))
        if p.method == "index":
            if not p.keep_indices:
                raise ConfigError("prune.method=index needs prune.keep_indices=[0,2,...] (source blocks to keep)")
            index_units(layout, list(p.keep_indices))
        else:
            target_units(layout, int(p.keep), str(p.pattern))
    if p.method == "learnable" and not (0 <= p.mask_ema_decay < 1 and p.logit_scale > 0 and p.logit_scale_end >= 0):
        raise ConfigError("prune.mask_ema_decay must lie in [0, 1), prune.logit_scale be > 0 and prune.logit_scale_end "
                          ">= 0 (0 = constant scaling)")
    if p.recover_steps < 0 or p.calib_batches < 1 or p.calib_batch_size < 1:
        raise ConfigError("prune.recover_steps must be >= 0 and prune.calib_batches / calib_batch_size >= 1")
    if RunDir(out).config.is_file() or (out.exists() and any(out.iterdir())):
        raise ConfigError(f"output run {out} already exists: set run.name=<new name> (or remove it)")
    source = Path(p.source)
    if not source.exists():
        raise ConfigError(f"prune.source '{p.source}' does not exist: pass a run directory, a checkpoints/step-N "
                          "folder or a weights file")


def is_run(source: Path) -> bool:
    """A ditk run or one of its checkpoints (else a bare weights file: .safetensors, .pt, ...)."""
    return (source / "config.yaml").is_file() or (source / "state.pt").is_file()


def load_source(cfg: DictConfig) -> torch.nn.Module:
    """The source model, built from the preset and loaded with the source's EMA weights. A ditk run must have
    the preset's architecture (the model section must agree)."""
    from ..models.convert import load_initial_weights

    source = Path(cfg.prune.source)
    if is_run(source):
        run, _ = resolve_checkpoint(source)
        theirs = model_section(load_run_config(run))
        mine = model_section(cfg)
        diff = [k for k in sorted(set(theirs) | set(mine)) if theirs.get(k) != mine.get(k)]
        if load_run_config(run).model.name != cfg.model.name or diff:
            k = diff[0] if diff else "name"
            raise ConfigError(f"prune.source {run} was trained with model.{k}={theirs.get(k, load_run_config(run).model.name)!r} "
                              f"but the preset says {mine.get(k, cfg.model.name)!r}: use the source's preset (or its config.yaml)")
    torch.manual_seed(cfg.run.seed)
    model = build_model(cfg)
    load_initial_weights(model, source)
    return model.eval().requires_grad_(False)


def lineage(cfg: DictConfig) -> dict:
    import platform

    from .. import __version__

    return {"command": sys.argv, "ditk_version": __version__, "parent": str(Path(cfg.prune.source)),
            "torch": torch.__version__, "python": platform.python_version(), "made_by": "ditk prune"}


def write_teacher(folder: Path, cfg: DictConfig, model: torch.nn.Module) -> None:
    """A bare weights source as a ditk run (config.yaml = the preset's, one checkpoint holding the EMA weights only),
    so the recovery's KD can load it as its teacher like any run."""
    from safetensors.torch import save_file

    from ..runs import write_manifest

    ckpt = folder / "checkpoints" / checkpoint_name(0)
    ckpt.mkdir(parents=True)
    (folder / "config.yaml").write_text(to_yaml(cfg))
    save_file({k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}, str(ckpt / "ema.safetensors"))
    write_manifest(ckpt, 0)
    (folder / "checkpoints" / "latest").write_text(ckpt.name + "\n")
    (folder / "lineage.json").write_text(json.dumps({**lineage(cfg), "made_by": "ditk prune (the weights file "
                                                     "prune.source as the recovery's KD teacher)"}, indent=2) + "\n")


def write_run(out: Path, cfg: DictConfig, small: torch.nn.Module, report: dict, teacher=None) -> None:
    """The pruned run, written into a temporary folder and renamed: a failure leaves nothing behind. `teacher`
    (config, model): also write the source as the run `teacher/` inside it (recovery from a bare weights file)."""
    from diffusers.optimization import get_scheduler
    from safetensors.torch import save_file

    with atomic_dir(out) as tmp:
        (tmp / "config.yaml").write_text(to_yaml(cfg))
        ckpt = tmp / "checkpoints" / checkpoint_name(0)
        ckpt.mkdir(parents=True)
        sd = {k: v.detach().contiguous().cpu() for k, v in small.state_dict().items()}
        save_file(sd, str(ckpt / "model.safetensors"))
        save_file(sd, str(ckpt / "ema.safetensors"))
        # The state `ditk train` resumes from: a fresh AdamW + schedule built exactly as the loop builds them (over
        # the parameters a freshly built model trains), so resuming or recovering starts from step 0 here.
        fresh = build_model(cfg)
        opt = torch.optim.AdamW([q for q in fresh.parameters() if q.requires_grad], lr=cfg.optim.lr,
                                betas=tuple(cfg.optim.betas), weight_decay=cfg.optim.weight_decay, eps=cfg.optim.eps)
        sched = get_scheduler(cfg.optim.schedule, opt, num_warmup_steps=cfg.optim.warmup_steps,
                              num_training_steps=cfg.train.max_steps)
        state = {"step": 0, "optimizer": opt.state_dict(), "lr_scheduler": sched.state_dict(),
                 "rng": {"torch": torch.get_rng_state()},
                 "data": {"seed": cfg.run.seed, "global_batch_size": cfg.train.global_batch_size}}
        torch.save(state, ckpt / "state.pt")
        (tmp / "checkpoints" / "latest").write_text(ckpt.name + "\n")
        (tmp / "pruning.json").write_text(json.dumps(report, indent=2) + "\n")
        (tmp / "lineage.json").write_text(json.dumps(lineage(cfg), indent=2) + "\n")
        if teacher is not None:
            write_teacher(tmp / TEACHER, *teacher)


def prune(cfg: DictConfig, out: Path, progress: bool = True) -> dict:
    """Run `ditk prune` with the resolved config `cfg`; writes the run at `out` and returns pruning.json."""
    from .calib import Calibration
    from .surgery import count_flops, count_params

    check_request(cfg, out)
    p = cfg.prune
    start = time.perf_counter()
    model = load_source(cfg)
    calib = Calibration(cfg, model)
    batches = calib.batches(p.seed, p.calib_batches, p.calib_batch_size)
    log(f"source {p.source}: {cfg.model.name}, {count_params(model):,} parameters; method {p.method}")

    if p.method in DEPTH_METHODS:
        from .depth import choose_blocks

        small, section, report = choose_blocks(model, cfg, calib, batches, log)
    elif p.method == "experts":
        from .experts import prune_experts

        small, section, report = prune_experts(model, cfg, calib, batches, log)
    elif p.method == "heads":
        from .heads import prune_heads

        small, section, report = prune_heads(model, cfg, calib, batches, log)
    else:
        from .width import prune_width

        small, section, report = prune_width(model, cfg, calib, batches, log)

    one = batches[0].slice(slice(0, 1))
    args_src, kw_src = calib.model_inputs(model, one)
    report.update({
        "method": p.method, "source": str(p.source), "source_model": model_section(cfg),
        "params_before": count_params(model), "params_after": count_params(small),
        "gflops_before": count_flops(model, args_src, kw_src) / 1e9,
        "gflops_after": count_flops(small, args_src, kw_src) / 1e9,
        "flops_counted": "torch.utils.flop_counter, one image, 2 FLOPs per multiply-add",
    })
    new_cfg = OmegaConf.to_container(cfg, resolve=True)
    new_cfg["model"] = {"name": cfg.model.name, **section}
    new_cfg["train"]["init_from"] = ""
    bare = not is_run(Path(p.source))
    if p.recover_steps > 0:
        from .recover import recovery_sections

        block_map = report.get("kept_blocks") or list(range(len(small.blocks)))
        # A weights file has no run to serve as the KD teacher: the source is written as one inside the pruned run.
        teacher = (out / TEACHER).resolve() if bare else Path(p.source).resolve()
        if bare:
            log(f"recovery teacher: {p.source} (weights) as the run {out / TEACHER} (its EMA weights, the preset's "
                "config)")
        distill, changes, note = recovery_sections(cfg, block_map, teacher)
        new_cfg["distill"] = distill
        new_cfg["optim"]["lr"] = changes["lr"]
        new_cfg["train"]["max_steps"] = changes["max_steps"]
        log(f"recovery: {p.recover_steps} steps of KD from {p.source}; learning rate {note}")
        report["recovery"] = {"steps": int(p.recover_steps), "lr": changes["lr"], "lr_rule": note, "kd": distill}
    from ..config import validate

    new_cfg = validate(OmegaConf.create(new_cfg))
    report["seconds"] = round(time.perf_counter() - start, 2)
    write_run(out, new_cfg, small, report, teacher=(cfg, model) if bare and p.recover_steps > 0 else None)
    log(f"wrote {out}: {report['params_before']:,} -> {report['params_after']:,} parameters, "
        f"{report['gflops_before']:.4f} -> {report['gflops_after']:.4f} GFLOPs per image")
    if p.recover_steps > 0:
        from ..train import train_in_run_dir

        code = train_in_run_dir(new_cfg, out, resume=None, progress=progress)
        report["recovery_exit_code"] = code
    return report
