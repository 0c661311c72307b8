"""VQ4DiT (Deng et al., "VQ4DiT: Efficient Post-Training Vector Quantization for Diffusion Transformers", AAAI 2025,
arXiv 2408.17131). No official code; the formulas below follow the paper's method section as we read it (its
equation numbers are not quoted: the text was not available offline), and the choices are listed after them.

Weight-only vector quantization (the paper's W2A16 / W3A16 settings):

  1. each row of W (out, in) is cut into sub-vectors w_i ∈ R^d along the input dimension (d = 4 by default);
     a per-layer codebook C ∈ R^{k×d} is fitted by k-means, k = 2^(bits·d) (capped: 256 for 2-bit d = 4), and
     the classic VQ assignment is the nearest codeword, A_i = argmin_k ‖w_i − c_k‖² (the paper's VQ setup);
  2. candidate assignments: the n nearest codewords of each sub-vector, A_i = {a_i1 … a_in}, with a softmax ratio
     r_i = softmax(z_i) and the soft sub-vector ŵ_i = Σ_j r_ij c_{a_ij}; z is initialised so that r_ij ∝ 1/‖w_i − c_{a_ij}‖
     (the paper initialises the ratios from the reciprocal distances);
  3. zero-data calibration: z and C are optimised together (Adam) to match the full-precision output,
     L = ‖X Ŵᵀ − X Wᵀ‖² / ‖X Wᵀ‖² + λ · mean_i (1 − Σ_j r_ij²), the second term pushing every ratio towards one-hot;
  4. hard assignment: each sub-vector takes the candidate with the largest ratio, Ŵ = C[argmax_j r_ij].

  5. block-wise (the paper's granularity, `--opt block=true`, default): the ratios and codebooks of all the
     layers of one DiT block are then calibrated together against the full-precision *block* output on the
     calibration inputs (ditk.quantize.blocks: L = ‖f_block(X; Ŵ) − f_block(X; W)‖² / ‖f_block(X; W)‖² + λ · the
     same ratio term), `block_steps` Adam steps, re-initialised from the reciprocal distances; the block keeps the
     result only if its hard-assigned output error is below that of the layer-wise step's weights.

Choices / simplifications (stated, not the paper's exact recipe):
  * before the block step, each Linear layer is calibrated alone against its own output (step 3): the layer's
    error only needs X Xᵀ, so ‖X Dᵀ‖² = tr(D (XᵀX) Dᵀ) is computed from the Hessian the calibration pass collects;
    the block step starts again from the reciprocal-distance ratios (the layer step is the fallback);
  * blocks are fed the full-precision model's inputs (not the quantized predecessor's);
  * the inputs are ditk's calibration set drawn from the full-precision model's own sampling trajectory (no
    dataset is used: "zero-data" in the paper's sense);
  * the regulariser 1 − Σ r² (zero iff one-hot) stands in for the paper's ratio-sharpening term, and its weight λ
    ramps linearly from 0 to `reg` over the steps (annealing; our choice);
  * a layer keeps the nearest-codeword assignment if calibration did not lower its output error (a safeguard);
  * activations stay in floating point unless --abits < 16 is given (then dynamic per-token, as `rtn`).
Defaults: --wbits 2, --opt dim=4 candidates=4 steps=300 lr=0.03 reg=3.0 kmeans_iters=20 max_codebook=4096
block=true block_steps=200 block_lr=0.01.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ...errors import ConfigError
from ...registry import PTQ_METHODS
from ..blocks import block_error, capture, find_blocks, reconstruct
from ..quantizers import check_bits
from ._common import act_bits, collect, merge_options, swap


def _sq_dists(v: torch.Tensor, c: torch.Tensor, chunk: int = 16384) -> torch.Tensor:
    """‖v_i − c_k‖² (n, k), in chunks of rows so a large layer does not allocate n × k at once per step."""
    return torch.cat([torch.cdist(v[i:i + chunk], c) ** 2 for i in range(0, v.shape[0], chunk)])


def kmeans(vectors: torch.Tensor, k: int, iters: int = 20, seed: int = 0) -> torch.Tensor:
    """Lloyd's k-means codebook (k, d) of `vectors` (n, d), initialised on k distinct vectors (k-means++ would
    also do; distinct points guarantee that k = #distinct vectors reproduces every vector exactly)."""
    distinct = torch.unique(vectors, dim=0)
    if k >= distinct.shape[0]:
        return distinct.clone()
    g = torch.Generator().manual_seed(seed)
    codebook = distinct[torch.randperm(distinct.shape[0], generator=g)[:k]].clone()
    for _ in range(iters):
        assign = _sq_dists(vectors, codebook).argmin(dim=1)
        sums = torch.zeros_like(codebook).index_add_(0, assign, vectors)
        counts = torch.bincount(assign, minlength=k).unsqueeze(1)
        # an empty cluster keeps its previous codeword
        codebook = torch.where(counts > 0, sums / counts.clamp(min=1), codebook)
    return codebook


def subvectors(w: torch.Tensor, dim: int) -> torch.Tensor:
    return w.reshape(-1, dim)


def output_error(delta: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """‖X Δᵀ‖² = tr(Δ H Δᵀ) with H = XᵀX."""
    return ((delta @ h) * delta).sum()


def calibrate(w: torch.Tensor, h: torch.Tensor, codebook: torch.Tensor, candidates: int = 4, steps: int = 300,
              lr: float = 3e-2, reg: float = 3.0) -> tuple[torch.Tensor, dict]:
    """VQ4DiT's candidate-assignment calibration of one layer: (hard-assigned weight, info).

    w: (out, in) weight; h: XᵀX (in, in) of its inputs; codebook: (k, d) from k-means."""
    dim = codebook.shape[1]
    w, h, codebook = w.float(), h.float(), codebook.float()
    v = subvectors(w, dim)
    dist = _sq_dists(v, codebook)
    n = min(candidates, codebook.shape[0])
    d_top, idx = dist.topk(n, dim=1, largest=False)  # (N, n) candidate codewords, nearest first
    nearest = codebook[idx[:, 0]].reshape(w.shape)
    ref = output_error(w, h).clamp(min=1e-30)
    err_nearest = float(output_error(nearest - w, h) / ref)
    info = {"error_nearest": err_nearest, "error_calibrated": err_nearest, "calibrated": False}
    if steps <= 0 or n < 2:
        return nearest, info
    logits = (-0.5 * torch.log(d_top + 1e-12)).requires_grad_(True)  # softmax → r ∝ 1/‖w − c‖
    cb = codebook.clone().requires_grad_(True)
    opt = torch.optim.Adam([logits, cb], lr=lr)
    for step in range(steps):
        r = torch.softmax(logits, dim=1)
        soft = (r.unsqueeze(-1) * cb[idx]).sum(dim=1).reshape(w.shape)
        # λ ramps from 0 to `reg`: the mixture first finds a good direction, then is forced to one codeword, so the
        # hard assignment below loses little (a constant λ left the ratios soft and argmax no better than nearest)
        lam = reg * step / steps
        loss = output_error(soft - w, h) / ref + lam * (1 - (r * r).sum(dim=1)).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        pick = idx.gather(1, logits.argmax(dim=1, keepdim=True)).squeeze(1)
        hard = cb[pick].reshape(w.shape)
        err_hard = float(output_error(hard - w, h) / ref)
    if err_hard < err_nearest:
        info.update(error_calibrated=err_hard, calibrated=True)
        return hard, info
    return nearest, info


class SoftVQWeight(nn.Module):
    """The parametrization of one layer's weight by its candidate codewords: Σ_j r_ij c_{a_ij} (soft) or
    c_{a_i argmax_j r_ij} (hard); logits z and the codebook C are learned, the candidates a are fixed."""

    def __init__(self, w: torch.Tensor, codebook: torch.Tensor, candidates: int):
        super().__init__()
        self.shape, dim = w.shape, codebook.shape[1]
        d_top, idx = _sq_dists(subvectors(w.float(), dim), codebook.float()).topk(min(candidates, codebook.shape[0]),
                                                                                    dim=1, largest=False)
        self.register_buffer("idx", idx)
        self.logits = nn.Parameter(-0.5 * torch.log(d_top + 1e-12))  # softmax -> r ∝ 1/‖w − c‖
        self.codebook = nn.Parameter(codebook.float().clone())
        self.hard = False

    def forward(self, _weight: torch.Tensor) -> torch.Tensor:
        if self.hard:
            pick = self.idx.gather(1, self.logits.argmax(dim=1, keepdim=True)).squeeze(1)
            return self.codebook[pick].reshape(self.shape)
        r = torch.softmax(self.logits, dim=1)
        return (r.unsqueeze(-1) * self.codebook[self.idx]).sum(dim=1).reshape(self.shape)

    def regulariser(self) -> torch.Tensor:
        r = torch.softmax(self.logits, dim=1)
        return (1 - (r * r).sum(dim=1)).mean()


def calibrate_block(block: nn.Module, layers: dict, data, steps: int = 200, lr: float = 1e-2, reg: float = 3.0,
                    candidates: int = 4) -> dict:
    """VQ4DiT's block-wise calibration: the candidate ratios and codebooks of `layers` ({name: (FakeQuantLinear in
    `block` holding its current (layer-wise) VQ weight, the full-precision weight, the k-means codebook)}) against
    the block's recorded full-precision output. Keeps the result only where it lowers the block's error."""
    acts = [layer.act for layer, _, _ in layers.values()]
    for layer, _, _ in layers.values():
        layer.act = None  # float activations while learning (rounding them has no gradient), as AdaRound/BRECQ
    before = block_error(block, data)
    current = [layer.weight.detach().clone() for layer, _, _ in layers.values()]
    soft = []
    for layer, w, codebook in layers.values():
        p = SoftVQWeight(w, codebook, candidates)
        parametrize.register_parametrization(layer, "weight", p, unsafe=True)
        soft.append(p)
    params = [t for p in soft for t in (p.logits, p.codebook)]
    # λ ramps from 0 to `reg` (as the layer step): find a good mixture first, then force it to one codeword
    reconstruct(block, data, params, steps, lr, lambda step: reg * step / steps * sum(p.regulariser() for p in soft) / len(soft))
    for p in soft:
        p.hard = True
    after = block_error(block, data)
    for (layer, _, _), old in zip(layers.values(), current):
        parametrize.remove_parametrizations(layer, "weight", leave_parametrized=True)
        layer.weight.requires_grad_(False)
        if after >= before:
            layer.weight.copy_(old)
    for (layer, _, _), act in zip(layers.values(), acts):
        layer.act = act
    return {"error_layerwise": before, "error_block": min(after, before), "kept": after < before}


DEFAULTS = {"dim": 4, "candidates": 4, "steps": 300, "lr": 3e-2, "reg": 3.0, "kmeans_iters": 20,
            "max_codebook": 4096, "block": True, "block_steps": 200, "block_lr": 1e-2}


@PTQ_METHODS.register("vq4dit", help="VQ4DiT: per-layer k-means codebooks + candidate assignments calibrated per layer, then per block (W2A16)")
def vq4dit(model, layers, inputs, wbits=None, abits=None, group_size=None, options=None, log=print):
    opts = merge_options(DEFAULTS, options, "vq4dit")
    wb = check_bits(2 if wbits is None else wbits, "--wbits", 1, 4)
    ab = act_bits(16 if abits is None else abits)
    dim = int(opts["dim"])
    if group_size:
        raise ConfigError("--simulate vq4dit has no --group-size: its codebooks are per layer (use --opt dim=D)")
    stats = collect(model, layers, inputs, hessian=True)
    blocks = find_blocks(model, layers) if opts["block"] else {}
    recorded = capture(model, list(blocks), inputs) if blocks else {}  # full-precision block inputs and outputs
    records, errors, kept = {}, {}, {}
    for name in layers:
        linear = model.get_submodule(name)
        if linear.in_features % dim:
            raise ConfigError(f"--opt dim={dim} does not divide {name}'s {linear.in_features} inputs: "
                              "use a divisor, e.g. dim=4 or dim=2")
        w = linear.weight.data.float().cpu()
        k = min(2 ** (wb * dim), int(opts["max_codebook"]))
        codebook = kmeans(subvectors(w, dim), k, int(opts["kmeans_iters"]))
        q, info = calibrate(w, stats.xxt[name].cpu(), codebook, int(opts["candidates"]), int(opts["steps"]),
                            float(opts["lr"]), float(opts["reg"]))
        kept[name] = (w, codebook)
        errors[name] = {key: round(v, 6) if isinstance(v, float) else v for key, v in info.items()}
        act = None if ab is None else {"bits": ab, "granularity": "token"}
        records[name] = swap(model, name, q.to(linear.weight.dtype), act,
                             {"weight_bits": wb, "vector_dim": dim, "codebook_size": codebook.shape[0],
                              "act_bits": ab, "activations": "float" if ab is None else "dynamic per token"})
    block_report = {}
    for block, names in blocks.items():
        inside = {n: (model.get_submodule(n), *kept[n]) for n in names}
        info = calibrate_block(model.get_submodule(block), inside, recorded[block], int(opts["block_steps"]),
                               float(opts["block_lr"]), float(opts["reg"]), int(opts["candidates"]))
        block_report[block] = {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in info.items()}
        log(f"vq4dit block calibration {block}: relative output error {info['error_layerwise']:.3e} (layer-wise) "
            f"-> {info['error_block']:.3e}")
    report = {"relative_output_error": errors, "options": opts}
    if block_report:
        report["block_calibration"] = block_report
    return {"weight_bits": wb, "act_bits": ab, "layers": records, "report": report}


vq4dit.defaults = DEFAULTS  # checked by ditk.quantize.api before anything is loaded
