"""LoRA adapters attached by forward hooks: Linear(x) + (alpha / r) * B(A(x)), A (r, in), B (out, r), B = 0 at start.

TinyFusion co-trains LoRA (rank 8, alpha 16, on every nn.Linear) with the mask so that the search prefers
masks the model can recover from. The adapters live outside the model (its state dict never changes) and are
dropped by leaving the `attach` context: the exported model is the source's weights, pruned.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn


class LoRA(nn.Module):
    def __init__(self, model: nn.Module, rank: int = 8, alpha: float = 16.0):
        super().__init__()
        self.rank, self.scale = rank, alpha / rank
        self.names = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
        self.A, self.B = nn.ParameterList(), nn.ParameterList()
        modules = dict(model.named_modules())
        for name in self.names:
            linear = modules[name]
            a = torch.empty(rank, linear.in_features, dtype=linear.weight.dtype)
            nn.init.kaiming_uniform_(a, a=math.sqrt(5))  # nn.Linear's default init (as torchtune's LoRALinear)
            self.A.append(nn.Parameter(a))
            self.B.append(nn.Parameter(torch.zeros(linear.out_features, rank, dtype=linear.weight.dtype)))

    def hooks(self) -> dict:
        def make(i):
            def hook(module, args, output):
                return output + (args[0] @ self.A[i].t() @ self.B[i].t()) * self.scale

            return hook

        return {name: make(i) for i, name in enumerate(self.names)}
