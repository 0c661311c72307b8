"""The edit methods: each is an inversion method plus injection rules (`ditk.edit.spec`) plus sampling settings.

naive        invert, then regenerate with the target condition (the baseline every paper compares to)
masactrl     MasaCtrl (Cao et al., ICCV 2023): from step S and block L on, the target's queries attend to the source
             branch's K/V (`k`, `v` replace from the live source branch). Defaults scale the paper's 4 of 50 steps
             and layer 10 of 16 to the grid: S = round(0.08 N), L = round(0.625 depth).
tic          TIC (Duan et al., AAAI 2024), implemented from the paper (no official code). Our reading:
             (1) inversion-enhanced control: the source (reconstruction) branch's self-attention K/V are replaced by
             the K/V captured during inversion at the same grid interval, so it retraces the inversion instead of
             drifting; (2) mask-guided attention concatenation: the target's queries attend to [K_tgt; K_src] and
             [V_tgt; V_src], the source tokens masked where the naive edit's attention output differs from the
             source's by more than `threshold` x the mean difference (or by --mask). Choices that are ours: the
             interval pairing of inversion and sampling evaluations, the mask statistic and its threshold (1.0),
             the block/step start (as MasaCtrl's).
rf-edit      RF-Solver-Edit (Wang et al., ICML 2025): V of the late blocks (the last half; the paper: single-stream
             blocks 20-37 of Flux) captured during RF-Solver inversion replaces the target's V in the first
             `inject` sampling steps (default round(0.2 N); the paper 2-8 of 25-30)
fireflow     FireFlow-Edit (Deng et al., ICML 2025): FireFlow inversion and sampling; V replace in blocks
             [start_block, stop_block) (default all) for the first `inject` steps (default 1)
rf-inversion RF-Inversion (Rout et al., ICLR 2025): controlled forward ODE (gamma 0.5) under the null condition,
             then the controlled reverse ODE towards the source image with strength eta (0.9) on the steps
             [start, stop) = [0, 0.25) of N
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Optional

import torch

from ..errors import ConfigError
from ..hooks import attach
from .features import FeatureCapture, FeatureStore
from .inversion import DEFAULT_METHOD, Inverted, check_method, invert, make_grid, sampling_start
from .spec import Injector, Layout, Rule, capture_points

EDITORS = ("naive", "tic", "masactrl", "rf-edit", "fireflow", "rf-inversion", "custom")
FLOW_ONLY = ("rf-edit", "fireflow", "rf-inversion")
KNOBS = {
    "naive": (), "masactrl": ("start_step", "start_layer"), "tic": ("start_step", "start_layer", "threshold"),
    "rf-edit": ("inject", "start_block"), "fireflow": ("inject", "start_block", "stop_block"),
    "rf-inversion": ("gamma", "eta", "start", "stop"), "custom": (),
}


@dataclass
class Plan:
    inversion: str
    rules: list
    branches: tuple
    inversion_options: dict
    sampling_options: dict


def plan(method: str, objective, depth: int, steps: int, knobs: Optional[dict] = None,
         inversion: Optional[str] = None, rules: Optional[list] = None) -> Plan:
    """Resolve an edit method into inversion method, rules and branches (knobs: the method's --opt values)."""
    knobs = dict(knobs or {})
    if method not in EDITORS:
        raise ConfigError(f"unknown edit method '{method}': use one of {', '.join(EDITORS)}")
    unknown = sorted(set(knobs) - set(KNOBS[method]))
    if unknown:
        allowed = ", ".join(KNOBS[method]) or "none"
        raise ConfigError(f"--opt {unknown[0]} does not apply to --method {method} (its options: {allowed})")
    flow = objective.name == "rectified-flow"
    if method in FLOW_ONLY and not flow:
        raise ConfigError(f"--method {method} edits rectified-flow models; this model is {objective.name}: "
                          "use naive, tic or masactrl")
    if method == "custom" and rules is None:
        raise ConfigError("--method custom needs --spec FILE (an injection spec)")
    if method != "custom" and rules is not None:
        raise ConfigError("--spec is for --method custom: drop it or use --method custom")
    start_step = int(knobs.get("start_step", round(0.08 * steps)))
    start_layer = int(knobs.get("start_layer", round(0.625 * depth)))
    late = list(range(min(start_layer, depth - 1), depth))
    defaults = {"tic": "euler" if flow else "ddim", "masactrl": "euler" if flow else "ddim",
                "rf-edit": "rf-solver", "fireflow": "fireflow", "rf-inversion": "rf-inversion"}
    inv = inversion or defaults.get(method, DEFAULT_METHOD[objective.name])
    inv_opts, samp_opts = {}, {}
    branches = ("target",)
    if method == "masactrl":
        rules = [Rule(blocks=late, tensor=t, op="replace", source="source", steps=(start_step, steps)) for t in "kv"]
        branches = ("source", "target")
    elif method == "tic":
        rules = [Rule(blocks=list(range(depth)), tensor=t, op="replace", source="inversion", apply_to="source")
                 for t in "kv"]
        rules.append(Rule(blocks=late, tensor="kv", op="concat", source="source", steps=(start_step, steps),
                          mask="auto", threshold=float(knobs.get("threshold", 1.0))))
        branches = ("source", "target")
    elif method == "rf-edit":
        inject = int(knobs.get("inject", max(1, round(0.2 * steps))))
        blocks = list(range(int(knobs.get("start_block", depth // 2)), depth))
        rules = [Rule(blocks=blocks, tensor="v", op="replace", source="inversion", steps=(0, inject))]
    elif method == "fireflow":
        inject = int(knobs.get("inject", 1))
        blocks = list(range(int(knobs.get("start_block", 0)), int(knobs.get("stop_block", depth))))
        rules = [Rule(blocks=blocks, tensor="v", op="replace", source="inversion", steps=(0, inject))]
    elif method == "rf-inversion":
        inv_opts = {"gamma": float(knobs.get("gamma", 0.5))}
        samp_opts = {"eta": float(knobs.get("eta", 0.9)), "start": float(knobs.get("start", 0.0)),
                     "stop": float(knobs.get("stop", 0.25))}
        rules = []
    elif method == "custom":
        if any(r.source == "source" or r.apply_to == "source" for r in rules):
            branches = ("source", "target")
    else:
        rules = []
    if method == "rf-inversion" and inv != "rf-inversion":
        raise ConfigError("--method rf-inversion inverts with the controlled ODE: drop --inversion")
    check_method(inv, objective)
    for r in rules:
        bad = [b for b in r.blocks if b >= depth]
        if bad:
            raise ConfigError(f"--opt start_layer/start_block gives block {bad[0]} but the model has {depth} blocks")
    return Plan(inv, rules, branches, inv_opts, samp_opts)


def edit(model, objective, x0: torch.Tensor, src_cond: dict, tgt_cond: dict, null_cond: dict, p: Plan, steps: int,
         cfg_scale: float = 1.0, image_mask: Optional[torch.Tensor] = None, inverted: Optional[Inverted] = None,
         store: Optional[FeatureStore] = None, seed: int = 0) -> dict:
    """Invert x0 (unless `inverted` + `store` are given) and run the edit pass. Returns edited (n, C, H, W), the
    source branch (or None), NFE per image, seconds and the feature-cache size."""
    from ..sampling import sample

    n = x0.shape[0]
    t0 = time.perf_counter()
    points = capture_points(p.rules)
    inv_nfe = 0
    if inverted is None or (points and store is None):
        capture = FeatureCapture(model, points)
        with capture.attached():
            # RF-Inversion inverts with the empty condition (u = v(Y_t, t; empty prompt) in the paper)
            inv_cond = null_cond if p.inversion == "rf-inversion" else src_cond
            inverted = invert(model, objective, x0, inv_cond, p.inversion, steps, p.inversion_options,
                              step_hooks=[capture], seed=seed)
        store = capture.store
        inv_nfe = inverted.nfe
    layout = Layout(n, p.branches)

    def per_branch(src, tgt):
        return torch.cat([src if b == "source" else tgt for b in p.branches], dim=0)

    x_start, pair = sampling_start(inverted)
    noise = per_branch(x_start, x_start)
    pair = per_branch(pair, pair) if pair is not None else None
    cond = {k: per_branch(src_cond[k], tgt_cond[k]) for k in tgt_cond}
    # guidance acts on the target only: the source rows' "unconditional" input is their own condition
    uncond = {k: per_branch(src_cond[k], null_cond[k]) for k in tgt_cond} if cfg_scale != 1.0 else None
    opts = dict(p.sampling_options)
    y0 = per_branch(x0, x0) if p.inversion == "rf-inversion" else None
    grid = make_grid(p.inversion, objective, steps, "sample", opts, pair=pair, y0=y0)
    injector = Injector(model, p.rules, layout, steps, store=store, image_mask=image_mask)
    with attach(model, injector.hook_fns()):
        out = sample(model, objective, noise, cond, uncond, solver=grid, cfg_scale=cfg_scale, step_hooks=[injector])
    rows_t = layout.rows("target", len(out))
    rows_s = layout.rows("source", len(out))
    per_image = inv_nfe + grid.nfe * len(p.branches) * (2 if cfg_scale != 1.0 else 1)
    return {
        "edited": out[rows_t], "source_branch": out[rows_s] if len(rows_s) else None, "nfe": per_image,
        "inversion_nfe": inv_nfe, "seconds": time.perf_counter() - t0,
        "feature_cache_mb": round((store.nbytes if store is not None else 0) / 2**20, 3),
        "mask_keep_fraction": (sum(injector.mask_fraction) / len(injector.mask_fraction)) if injector.mask_fraction else None,
        "inverted": inverted,
    }
