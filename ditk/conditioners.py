"""What the model is conditioned on, as keyword arguments of `model(x, t, **cond)`.

`class`: DiT's class label `y` (N,) long; label `num_classes` is the null ("no class") label that
classifier-free guidance uses for the unconditional half and that training substitutes with probability p
(DiT's LabelEmbedder.token_drop, here drawn from an explicit generator so runs are reproducible).
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from typing import Optional, Sequence

import torch

from .errors import ConfigError
from .registry import CONDITIONERS


@dataclass
class ClassConditionerConfig:
    pass  # everything it needs (the number of classes and their names) comes from the data set


class ClassConditioner:
    def __init__(self, num_classes: int, class_names: Optional[Sequence[str]] = None):
        if num_classes <= 0:
            raise ConfigError(f"a class conditioner needs at least one class, got num_classes={num_classes}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = int(num_classes)
        self.null_label = self.num_classes
        self.class_names = list(class_names) if class_names is not None else None

    def cond(self, labels, device=None) -> dict:
        y = torch.as_tensor(labels, dtype=torch.long, device=device)
        if y.numel() and (int(y.min()) < 0 or int(y.max()) > self.null_label):
            raise ConfigError(f"class labels must lie in 0..{self.num_classes - 1} (or {self.null_label} = null)")
        return {"y": y}

    def uncond(self, n: int, device=None) -> dict:
        return {"y": torch.full((n,), self.null_label, dtype=torch.long, device=device)}

    def drop(self, labels: torch.Tensor, generator: Optional[torch.Generator], p: float) -> torch.Tensor:
        """Replace each label by the null label with probability p (label dropout for CFG training).

        The uniforms are drawn on the generator's device (one per label, in order), so slicing a global
        batch's result per rank equals dropping per rank with the same draws.
        """
        if p <= 0:
            return labels
        device = generator.device if generator is not None else labels.device
        drop = torch.rand(labels.shape[0], generator=generator, device=device).to(labels.device) < p
        return torch.where(drop, torch.full_like(labels, self.null_label), labels)

    def parse_labels(self, text: str) -> list[int]:
        """'3,5,7', '3 5 7' or class names ('cat, dog'; case-insensitive) -> [int]; ConfigError if invalid.

        With a comma anywhere, only commas separate (so names may contain spaces: 'tench, great white shark').
        """
        text = str(text).strip()
        tokens = [t.strip() for t in re.split(r"," if "," in text else r"\s+", text) if t.strip()]
        if not tokens:
            raise ConfigError(f"no class labels given: use e.g. '0,1,2' (0..{self.num_classes - 1})")
        names = {n.lower(): i for i, n in enumerate(self.class_names or [])}
        out = []
        for token in tokens:
            if re.fullmatch(r"[+-]?\d+", token):
                label = int(token)
                if not 0 <= label < self.num_classes:
                    raise ConfigError(f"class label {label} is out of range: use 0..{self.num_classes - 1}")
            elif token.lower() in names:
                label = names[token.lower()]
            else:
                close = difflib.get_close_matches(token.lower(), names, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"use numbers 0..{self.num_classes - 1}"
                raise ConfigError(f"unknown class '{token}': {hint}")
            out.append(label)
        return out


@CONDITIONERS.register("class", config=ClassConditionerConfig)
def build_class_conditioner(cfg, num_classes: int, class_names: Optional[Sequence[str]] = None) -> ClassConditioner:
    """Class label `y`, null label = num_classes (DiT)."""
    return ClassConditioner(num_classes, class_names)
