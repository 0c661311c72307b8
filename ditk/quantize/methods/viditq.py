"""ViDiT-Q (Zhao et al., "ViDiT-Q: Efficient and Accurate Quantization of Diffusion Transformers for Image and Video
Generation", ICLR 2025), its W8A8 setting as released (thu-nics/ViDiT-Q `t2i/configs/quant/*/w8a8.yaml`):

  * weights per output channel, min-max, round to nearest;
  * activations dynamic per token, min-max (ViDiT-Q §4.2: token- and timestep-wise variation handled by computing
    the quantization parameters at run time);
  * channel balancing (§4.3, the "static" scaling part): s_j = a_j^α / max_o |W_oj|^(1-α) with α = 0.3, X' = X / s,
    W' = W diag(s); a_j is the activation salience tracked over the sampling trajectory with momentum 0.95:
    a ← 0.95 a + 0.05 ā_t at each calibration timestep t (first: a = ā_t), where ā_t is the mean over samples of the
    per-sample max |X_j| over tokens (the official `momentum_act_max`), taken in trajectory order (t = T ... 0).

Not done (stated): the rotation-based "dynamic" balancing and the metric-decoupled mixed precision of W4A8 and
below, and per-time-range balancing factors (the released W8A8 config uses one range, [0, 1000]).
"""

from __future__ import annotations

import torch

from ...registry import PTQ_METHODS
from ..quantizers import check_bits, quantize_weight
from ..smoothing import balance, balance_factors
from ._common import act_bits, collect, fit_group, merge_options, swap

DEFAULTS = {"alpha": 0.3, "momentum": 0.95}


def momentum_salience(summax_t: dict, momentum: float) -> torch.Tensor:
    """a after the momentum updates over the calibration timesteps, in trajectory order (largest t first)."""
    a = None
    for t in sorted(summax_t, reverse=True):
        total, count = summax_t[t]
        mean = total / count
        a = mean if a is None else momentum * a + (1 - momentum) * mean
    return a


@PTQ_METHODS.register("viditq", help="ViDiT-Q (W8A8 as released): momentum channel balancing + per-channel weights + dynamic per-token activations")
def viditq(model, layers, inputs, wbits=None, abits=None, group_size=None, options=None, log=print):
    opts = merge_options(DEFAULTS, options, "viditq")
    wb = check_bits(8 if wbits is None else wbits, "--wbits", 2, 8)
    ab = act_bits(abits)
    stats = collect(model, layers, inputs)
    records = {}
    for name in layers:
        linear = model.get_submodule(name)
        w = linear.weight.data
        s = balance_factors(momentum_salience(stats.summax_t[name], float(opts["momentum"])), w, float(opts["alpha"]))
        g = fit_group(linear.in_features, group_size)
        act = None if ab is None else {"bits": ab, "granularity": "token"}
        records[name] = swap(model, name, quantize_weight(balance(w, s), wb, g), act,
                             {"weight_bits": wb, "group_size": g, "act_bits": ab, "alpha": opts["alpha"],
                              "activations": "dynamic per token"}, smooth=s)
    return {"weight_bits": wb, "act_bits": ab, "layers": records}


viditq.defaults = DEFAULTS  # checked by ditk.quantize.api before anything is loaded
