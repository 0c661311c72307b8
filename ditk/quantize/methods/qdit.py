"""Q-DiT (Chen et al., "Q-DiT: Accurate Post-Training Quantization for Diffusion Transformers", CVPR 2025).

  * weights: GPTQ (ditk.quantize.gptq) with group quantization along the input channels, one group size per layer;
  * group sizes: evolutionary search (Q-DiT §3.2, Alg. 1) over per-layer choices under a bit budget: a population
    of configurations; each iteration keeps the best half (fitness) and refills it by uniform crossover of two parents
    and by mutation (each layer's size resampled with probability `mutation`), dropping children over the budget;
  * activations: dynamic per-sample, per-group min-max quantization at run time (Q-DiT §3.3): one scale per sample
    and group of `act_group` channels, over all the sample's tokens.

Choices (the paper's are FID-based and sized for A100s): fitness is the mean squared error of the model output
against full precision on calibration inputs spread over timesteps
and classes, not FID of generated samples; the budget is the average
bits per weight including one 16-bit scale and one 16-bit zero per group, wbits + 32 / g, at most that of a uniform
`--group-size` (default 32); candidates are the divisors of each layer's input width from 8 up (and per channel);
GPTQ is run on full-precision layer inputs (not sequentially). Defaults: population 16, 6 iterations, mutation 0.1.
"""

from __future__ import annotations

import random

import torch

from ...registry import PTQ_METHODS
from ..calibration import run_model
from ..gptq import gptq
from ..quantizers import check_bits
from ._common import act_bits, collect, fit_group, merge_options, swap


def _cost(wbits: int, in_f: int, g) -> float:
    return wbits + 32.0 / (g or in_f)  # bits per weight with a 16-bit scale and zero per group


DEFAULTS = {"search": True, "population": 16, "iterations": 6, "mutation": 0.1, "act_group": 128, "seed": 0,
            "fitness_inputs": 128}


@PTQ_METHODS.register("qdit", help="Q-DiT: GPTQ weights, per-layer group sizes by evolutionary search, dynamic per-sample group activations")
def qdit(model, layers, inputs, wbits=None, abits=None, group_size=None, options=None, log=print):
    opts = merge_options(DEFAULTS, options, "qdit")
    wb = check_bits(4 if wbits is None else wbits, "--wbits", 2, 8)
    ab = act_bits(abits)
    uniform_group = 32 if group_size is None else group_size
    shapes = {n: model.get_submodule(n).weight.shape for n in layers}
    weights = {n: model.get_submodule(n).weight.data.clone() for n in layers}
    stats = collect(model, layers, inputs, hessian=True)
    n_fit = min(int(opts["fitness_inputs"]), len(inputs["x"]))
    pick = torch.linspace(0, len(inputs["x"]) - 1, n_fit).round().long()  # spread over timesteps and classes
    fit_rows = {k: v[pick] for k, v in inputs.items()}
    reference = run_model(model, fit_rows)

    candidates = {n: sorted({d for d in range(8, shapes[n][1]) if shapes[n][1] % d == 0} | {None}, key=lambda g: g or 10**9)
                  for n in layers}
    sizes = {n: shapes[n].numel() for n in layers}
    budget = sum(sizes[n] * _cost(wb, shapes[n][1], fit_group(shapes[n][1], uniform_group)) for n in layers) / sum(sizes.values())

    def bits_of(config):
        return sum(sizes[n] * _cost(wb, shapes[n][1], g) for n, g in zip(layers, config)) / sum(sizes.values())

    quantized: dict = {}

    def weight_for(name, g):
        if (name, g) not in quantized:
            quantized[(name, g)] = gptq(weights[name], stats.xxt[name], wb, g)
        return quantized[(name, g)]

    records = {}
    for name in layers:  # swap every layer once; the search only changes their weights
        in_f = shapes[name][1]
        act = None if ab is None else {"bits": ab, "granularity": "sample-group", "group_size": fit_group(in_f, opts["act_group"])}
        records[name] = swap(model, name, weights[name], act, {})

    def apply(config):
        with torch.no_grad():
            for name, g in zip(layers, config):
                model.get_submodule(name).weight.copy_(weight_for(name, g))

    scores: dict = {}

    def fitness(config):
        if config not in scores:
            apply(config)
            scores[config] = float(((run_model(model, fit_rows) - reference) ** 2).mean())
        return scores[config]

    uniform = tuple(fit_group(shapes[n][1], uniform_group) for n in layers)
    best = uniform
    if opts["search"]:
        rng = random.Random(opts["seed"])
        population = [uniform]
        tries = 0
        while len(population) < opts["population"] and tries < 1000:
            tries += 1
            c = tuple(rng.choice(candidates[n]) for n in layers)
            if bits_of(c) <= budget + 1e-9 and c not in population:
                population.append(c)
        for it in range(opts["iterations"]):
            population.sort(key=fitness)
            parents = population[: max(2, len(population) // 2)]
            children, tries = [], 0
            while len(parents) + len(children) < opts["population"] and tries < 1000:
                tries += 1
                a, b = rng.sample(parents, 2)
                child = tuple(rng.choice(pair) for pair in zip(a, b))  # uniform crossover
                child = tuple(rng.choice(candidates[n]) if rng.random() < opts["mutation"] else g
                              for n, g in zip(layers, child))
                if bits_of(child) <= budget + 1e-9 and child not in parents and child not in children:
                    children.append(child)
            population = parents + children
            log(f"qdit search iteration {it + 1}/{opts['iterations']}: best output MSE {fitness(population[0]):.3e} "
                f"(uniform group {uniform_group}: {fitness(uniform):.3e})")
        best = min(population + [uniform], key=fitness)
    apply(best)
    for name, g in zip(layers, best):
        records[name].update({"weight_bits": wb, "group_size": g, "act_bits": ab, "weight_quantizer": "GPTQ",
                              "activations": "dynamic per sample and channel group"})
    report = {"bit_budget": round(budget, 4), "bits_per_weight": round(bits_of(best), 4),
              "output_mse": fitness(best), "output_mse_uniform_groups": fitness(uniform),
              "configurations_evaluated": len(scores), "fitness": "output MSE vs full precision on calibration inputs"}
    apply(best)  # fitness() of `uniform` above may have left other weights in place
    return {"weight_bits": wb, "act_bits": ab, "layers": records, "report": report}


qdit.defaults = DEFAULTS  # checked by ditk.quantize.api before anything is loaded
