"""Round-to-nearest baseline: min-max weights (per output channel, or per group of --group-size input channels)
and dynamic per-token min-max activations. The reference point every DiT PTQ paper reports against."""

from __future__ import annotations

from ...registry import PTQ_METHODS
from ..quantizers import check_bits, quantize_weight
from ._common import act_bits, fit_group, merge_options, swap


DEFAULTS: dict = {}


@PTQ_METHODS.register("rtn", help="round-to-nearest weights (per channel / group) + dynamic per-token activations")
def rtn(model, layers, inputs, wbits=None, abits=None, group_size=None, options=None, log=print):
    merge_options(DEFAULTS, options, "rtn")
    wb = check_bits(8 if wbits is None else wbits, "--wbits", 2, 8)
    ab = act_bits(abits)
    records = {}
    for name in layers:
        linear = model.get_submodule(name)
        g = fit_group(linear.in_features, group_size)
        act = None if ab is None else {"bits": ab, "granularity": "token"}
        records[name] = swap(model, name, quantize_weight(linear.weight.data, wb, g), act,
                             {"weight_bits": wb, "group_size": g, "act_bits": ab, "activations": "dynamic per token"})
    return {"weight_bits": wb, "act_bits": ab, "layers": records}


rtn.defaults = DEFAULTS  # checked by ditk.quantize.api before anything is loaded
