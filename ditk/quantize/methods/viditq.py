"""ViDiT-Q (Zhao et al., "ViDiT-Q: Efficient and Accurate Quantization of Diffusion Transformers for Image and Video
Generation", ICLR 2025; code thu-nics/ViDiT-Q).

W8A8 as released (`t2i/configs/quant/*/w8a8.yaml`):
  * weights per output channel, min-max, round to nearest;
  * activations dynamic per token, min-max (§4.2: token- and timestep-wise variation handled by computing
    the quantization parameters at run time);
  * channel balancing by scaling (§4.3): s_j = a_j^α / max_o |W_oj|^(1-α) with α = 0.3, X' = X / s,
    W' = W diag(s); a_j is the activation salience tracked over the sampling trajectory with momentum 0.95:
    a ← 0.95 a + 0.05 ā_t at each calibration timestep t (first: a = ā_t), where ā_t is the mean over samples of the
    per-sample max |X_j| over tokens (the official `momentum_act_max`), taken in trajectory order (t = T ... 0).

Below W8A8 (W4A8, W6A6: the paper's low-bit settings) two more parts, on by default there (`--opt rotation=`,
`mixed=`; "auto" = on below W8A8):
  * static-dynamic channel balancing (§4.3): the scaling above removes the *static* channel imbalance (the
    salience averaged over timesteps), an orthogonal Hadamard rotation R then spreads the *dynamic* (timestep-
    varying) outliers over all channels:  X'' = (X diag(s)⁻¹) R,  W'' = (W diag(s)) R,  so X'' W''ᵀ = X Wᵀ in exact
    arithmetic (R Rᵀ = I; tested in float64). R is block-diagonal Sylvester Hadamard (block = largest power of two
    dividing the width; ditk.quantize.rotation);
  * metric-decoupled mixed precision (§4.4, after MixDQ): each layer's sensitivity is measured with that layer
    alone quantized (the rest in full precision), separately for each metric, each metric normalised by its total
    over the layers so neither dominates; then per-layer (weight, activation) bits are chosen by the integer program
    of ditk.quantize.mixed: least summed sensitivity with BitOps (wbits × abits × weights) at most
    (1 + `mp_extra`) × the uniform setting's. Options per layer: the requested (wbits, abits) and W8A8.

Choices (stated): the paper's metrics (CLIP score, temporal and aesthetic metrics) need prompts and videos; here the
two decoupled metrics are the relative output error on the high-noise half of the calibration timesteps ("content":
layout is decided there) and on the low-noise half ("detail"). mp_extra = 0.125 by default (W4A8 -> at most the
BitOps of W4.5A8). Per-time-range balancing factors are not done (the released configs use one range, [0, 1000]).
"""

from __future__ import annotations

import torch

from ...errors import ConfigError
from ...registry import PTQ_METHODS
from ..calibration import run_model
from ..layers import set_module
from ..mixed import allocate
from ..quantizers import check_bits, quantize_weight
from ..rotation import block_hadamard, block_size
from ..smoothing import balance, balance_factors
from ._common import act_bits, collect, fit_group, merge_options, swap

DEFAULTS = {"alpha": 0.3, "momentum": 0.95, "rotation": "auto", "mixed": "auto", "mp_extra": 0.125,
            "mp_inputs": 64}


def momentum_salience(summax_t: dict, momentum: float) -> torch.Tensor:
    """a after the momentum updates over the calibration timesteps, in trajectory order (largest t first)."""
    a = None
    for t in sorted(summax_t, reverse=True):
        total, count = summax_t[t]
        mean = total / count
        a = mean if a is None else momentum * a + (1 - momentum) * mean
    return a


def balanced_weight(w: torch.Tensor, s: torch.Tensor, rotation: int) -> torch.Tensor:
    """W'' = (W diag(s)) R: the weight that multiplies (X diag(s)⁻¹) R (rotation = Hadamard block, 0 = none)."""
    w = balance(w, s)
    if rotation:
        w = w @ block_hadamard(w.shape[1], rotation, w.dtype).to(w.device)
    return w


def _switch(value, low_bit: bool, name: str) -> bool:
    if value == "auto":
        return low_bit
    if isinstance(value, bool):
        return value
    raise ConfigError(f"--opt {name}={value}: use true, false or auto")


def phase_errors(out: torch.Tensor, ref: torch.Tensor, t: torch.Tensor) -> tuple[float, float]:
    """(relative output error on the high-noise half of the rows' timesteps, on the low-noise half)."""
    err = ((out - ref) ** 2).flatten(1).sum(1)
    energy = (ref ** 2).flatten(1).sum(1).clamp_min(1e-30)
    high = t.float() > t.float().median()  # torch's median is the lower one: [10, 20, 800, 900] -> 800, 900
    if not high.any():  # a single timestep: both metrics see it
        high = torch.ones_like(high)
    low = ~high if (~high).any() else high
    return float(err[high].sum() / energy[high].sum()), float(err[low].sum() / energy[low].sum())


@PTQ_METHODS.register("viditq", help="ViDiT-Q: channel balancing (scaling; + Hadamard rotation and metric-decoupled "
                      "mixed precision below W8A8), per-channel weights, dynamic per-token activations")
def viditq(model, layers, inputs, wbits=None, abits=None, group_size=None, options=None, log=print):
    opts = merge_options(DEFAULTS, options, "viditq")
    wb = check_bits(8 if wbits is None else wbits, "--wbits", 2, 8)
    ab = act_bits(abits)
    low_bit = wb < 8 or (ab is not None and ab < 8)
    rotate = _switch(opts["rotation"], low_bit, "rotation")
    mixed = _switch(opts["mixed"], low_bit, "mixed")
    stats = collect(model, layers, inputs)
    plans = {}  # name -> (balanced weight, s, rotation block, group size)
    for name in layers:
        linear = model.get_submodule(name)
        s = balance_factors(momentum_salience(stats.summax_t[name], float(opts["momentum"])), linear.weight.data,
                            float(opts["alpha"]))
        block = block_size(linear.in_features) if rotate else 0
        plans[name] = (balanced_weight(linear.weight.data, s, block), s, block, fit_group(linear.in_features, group_size))

    def build(name, bits):  # swap `name` for its fake-quant layer at (weight bits, act bits)
        w_bal, s, block, g = plans[name]
        w_bits, a_bits = bits
        act = None if a_bits is None else {"bits": a_bits, "granularity": "token"}
        record = {"weight_bits": w_bits, "group_size": g, "act_bits": a_bits, "alpha": opts["alpha"],
                  "activations": "dynamic per token", "balancing": "scaling+rotation" if block else "scaling"}
        return swap(model, name, quantize_weight(w_bal, w_bits, g).to(w_bal.dtype), act, record, smooth=s,
                    rotation=block)

    choice = {name: (wb, ab) for name in layers}
    report = {"rotation": rotate, "mixed_precision": mixed}
    high = (8, 8 if ab is not None else None)
    if mixed and high != (wb, ab):
        choice, report["mixed"] = _allocate(model, layers, inputs, build, (wb, ab), high, opts, log)
    records = {name: build(name, choice[name]) for name in layers}
    return {"weight_bits": wb, "act_bits": ab, "layers": records, "report": report}


def _allocate(model, layers, inputs, build, base, high, opts, log):
    """Metric-decoupled sensitivities of every layer at each option, then the exact bit allocation."""
    n = min(int(opts["mp_inputs"]), len(inputs["x"]))
    pick = torch.linspace(0, len(inputs["x"]) - 1, n).round().long()  # spread over timesteps and classes
    rows = {k: v[pick] for k, v in inputs.items()}
    reference = run_model(model, rows)
    options = [base, high]
    sens = {}  # name -> [(content, detail) per option]
    for name in layers:
        original = model.get_submodule(name)
        sens[name] = []
        for bits in options:
            build(name, bits)
            sens[name].append(phase_errors(run_model(model, rows), reference, rows["t"]))
        set_module(model, name, original)  # measured alone: the others stay in full precision
    totals = [sum(sens[name][0][m] for name in layers) or 1.0 for m in (0, 1)]
    losses = [[sum(s[m] / totals[m] for m in (0, 1)) for s in sens[name]] for name in layers]
    a16 = lambda a: 16 if a is None else a  # noqa: E731  (float activations count as 16 bits)
    costs = [[w * a16(a) * model.get_submodule(name).weight.numel() for w, a in options] for name in layers]
    capacity = int((1 + float(opts["mp_extra"])) * sum(c[0] for c in costs))
    picked = allocate(costs, losses, capacity)
    choice = {name: options[o] for name, o in zip(layers, picked)}
    spent = sum(c[o] for c, o in zip(costs, picked)) / sum(c[0] for c in costs)
    promoted = [name for name, o in zip(layers, picked) if o == 1]
    log(f"viditq mixed precision: {len(promoted)}/{len(layers)} layers at W{high[0]}A{high[1] or 16}, "
        f"BitOps {spent:.3f} x uniform (budget {1 + float(opts['mp_extra']):.3f})")
    return choice, {"promoted": promoted, "bitops_vs_uniform": round(spent, 4), "budget": 1 + float(opts["mp_extra"]),
                    "sensitivity_content_detail": {name: [[round(v, 6) for v in s] for s in sens[name]] for name in layers},
                    "metrics": "relative output error, high-noise half (content) and low-noise half (detail) of the "
                               "calibration timesteps, each normalised by its sum over layers"}


viditq.defaults = DEFAULTS  # checked by ditk.quantize.api before anything is loaded
