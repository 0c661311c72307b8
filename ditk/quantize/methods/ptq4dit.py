"""PTQ4DiT (Wu et al., "PTQ4DiT: Post-training Quantization for Diffusion Transformers", NeurIPS 2024).

  * Channel-wise Salience Balancing (CSB, §4.1, eq. 5-6): b_j = sqrt(s(X_j) / s(W_j)), X' = X diag(b)⁻¹,
    W' = W diag(b) (ditk.quantize.smoothing), so the extreme channels of activations and weights no longer coincide;
  * Spearman's-ρ-guided Salience Calibration (SSC, §4.2, eq. 8-9): the activation salience varies over timesteps,
    so s(X) = Σ_t η_t s(X⁽ᵗ⁾) with η_t = exp(-ρ_t) / Σ_τ exp(-ρ_τ), ρ_t = Spearman(s(X⁽ᵗ⁾), s(W)): timesteps whose
    activation salience is less correlated with the weight salience (where balancing helps most) weigh more;
  * then weights per output channel (min-max) and activations per tensor with a static scale calibrated on the
    balanced calibration activations (max |X'|).

Block reconstruction (the paper's last step, `quant_sample.py --ptq --recon` in its code: Q-Diffusion's
BRECQ/AdaRound): `--opt recon=true` (default) learns each weight's rounding (up or down on its min-max grid) per
DiT block against the full-precision block output on the calibration inputs (ditk.quantize.adaround,
ditk.quantize.blocks), `recon_steps` Adam steps per block (default 200; BRECQ uses 20,000 on a GPU), activations in
floating point while learning (BRECQ's weight stage); not done: the activation step-size (LSQ) stage. Blocks are fed
the full-precision model's inputs (not the quantized predecessor's). A block whose learned rounding does not lower
its output error keeps round-to-nearest.

Not done (stated): re-parameterising the balancing into adaLN / the previous linear (the official code does not
implement it either); here X' = X / b is applied by the fake-quant layer itself, which gives the same arithmetic.
CSB is applied to every quantized layer.
"""

from __future__ import annotations

import torch

from ...registry import PTQ_METHODS
from ..quantizers import check_bits, quantize_weight, static_scale
from ..smoothing import balance, balance_factors, weight_salience
from ..adaround import adaround_block
from ..blocks import capture, find_blocks
from ._common import act_bits, collect, fit_group, merge_options, swap


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman's rank correlation (Pearson correlation of the ranks; ties are broken by order)."""
    ra = torch.argsort(torch.argsort(a)).double()
    rb = torch.argsort(torch.argsort(b)).double()
    ra, rb = ra - ra.mean(), rb - rb.mean()
    return float((ra * rb).sum() / (ra.norm() * rb.norm()).clamp_min(1e-12))


def ssc_salience(per_t: dict, weight: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """s(X) = Σ_t η_t s(X⁽ᵗ⁾) (eq. 8-9); also returns {t: (ρ_t, η_t)}."""
    ts = sorted(per_t)
    sw = weight_salience(weight)
    rho = torch.tensor([spearman(per_t[t], sw) for t in ts], dtype=torch.float64)
    eta = torch.softmax(-rho, dim=0)
    s = sum(float(e) * per_t[t].double() for e, t in zip(eta, ts))
    return s.to(weight.dtype), {int(t): (round(float(r), 4), round(float(e), 4)) for t, r, e in zip(ts, rho, eta)}


DEFAULTS = {"ssc": True, "recon": True, "recon_steps": 200}  # ssc=false: CSB with the salience over all timesteps at once


@PTQ_METHODS.register("ptq4dit", help="PTQ4DiT: channel-wise salience balancing with Spearman-guided timestep calibration, then AdaRound block reconstruction")
def ptq4dit(model, layers, inputs, wbits=None, abits=None, group_size=None, options=None, log=print):
    opts = merge_options(DEFAULTS, options, "ptq4dit")
    wb = check_bits(8 if wbits is None else wbits, "--wbits", 2, 8)
    ab = act_bits(abits)
    stats = collect(model, layers, inputs)
    blocks = find_blocks(model, layers) if opts["recon"] else {}
    recorded = capture(model, list(blocks), inputs) if blocks else {}  # full-precision block inputs and outputs
    records, rhos, plans = {}, {}, {}
    for name in layers:
        linear = model.get_submodule(name)
        w = linear.weight.data
        if opts["ssc"]:
            sx, rhos[name] = ssc_salience(stats.absmax_t[name], w)
        else:
            sx = stats.absmax[name]
        b = balance_factors(sx, w)
        g = fit_group(linear.in_features, group_size)
        plans[name] = (balance(w, b), wb, g)
        wq = quantize_weight(plans[name][0], wb, g)
        act, scale = None, None
        if ab is not None:
            act = {"bits": ab, "granularity": "tensor", "symmetric": True}
            scale = static_scale((stats.absmax[name] / b).max(), ab)  # max |X'| over the calibration set
        records[name] = swap(model, name, wq, act, {"weight_bits": wb, "group_size": g, "act_bits": ab,
                                                     "activations": "static per tensor" if ab else None},
                             smooth=b, act_scale=scale)
    recon = {}
    for block, names in blocks.items():
        inside = {n: (model.get_submodule(n), *plans[n]) for n in names}
        recon[block] = {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in
                        adaround_block(model.get_submodule(block), inside, recorded[block], int(opts["recon_steps"])).items()}
        log(f"ptq4dit block reconstruction {block}: relative output error {recon[block]['error_nearest']:.3e} "
            f"(round to nearest) -> {recon[block]['error_adaround']:.3e}")
        for n in names:
            records[n]["rounding"] = "adaround (block reconstruction)" if recon[block]["kept"] else "nearest"
    report = {"spearman_rho_and_weight_per_timestep": rhos} if opts["ssc"] else {}
    if recon:
        report["block_reconstruction"] = recon
    return {"weight_bits": wb, "act_bits": ab, "layers": records, "report": report}


ptq4dit.defaults = DEFAULTS  # checked by ditk.quantize.api before anything is loaded
