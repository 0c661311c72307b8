"""Calibration data for pruning: seeded batches (x0, t, noise, conditioning) drawn the way `ditk.train` draws
them, and the run's own diffusion loss on a batch. Scores, the learnable search and recovery all read these,
so every method sees the same data, timesteps and noise."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from omegaconf import DictConfig

from ..build import build_autoencoder, build_conditioner, build_dataset, build_objective, latent_shape
from ..train import mix_conditions, step_generator


@dataclass
class Batch:
    x0: torch.Tensor
    t: torch.Tensor
    noise: torch.Tensor
    cond: dict

    def slice(self, part: slice) -> "Batch":
        return Batch(self.x0[part], self.t[part], self.noise[part], {k: v[part] for k, v in self.cond.items()})


class Calibration:
    """The run's data, objective and conditioner; batches are pure functions of (seed, index)."""

    def __init__(self, cfg: DictConfig, model, device=torch.device("cpu")):
        self.cfg, self.device = cfg, device
        self.objective = build_objective(cfg)
        self.dataset = build_dataset(cfg)
        self.encoder = build_autoencoder(cfg).to(device)
        names = list(getattr(self.dataset, "class_names", None) or []) or None
        self.conditioner = build_conditioner(cfg, self.dataset.num_classes, names, model=model)
        self.shape = latent_shape(model)
        self.drop_p = float(getattr(cfg.model, "class_dropout_prob", 0.0))

    def batch(self, seed: int, index: int, size: int) -> Batch:
        gen = step_generator(seed, index)
        rows = torch.randint(len(self.dataset), (size,), generator=gen).tolist()
        items = [self.dataset[i] for i in rows]
        images = torch.stack([torch.as_tensor(item[0]) for item in items]).to(self.device)
        labels = [item[1] for item in items]
        labels = torch.as_tensor(labels) if not isinstance(labels[0], str) else labels
        t = self.objective.sample_time(size, gen)
        noise = torch.randn((size, *self.shape), generator=gen)
        drop = torch.rand(size, generator=gen) < self.drop_p  # label dropout, as in training (keeps CFG working)
        with torch.no_grad():
            x0 = self.encoder.encode(images, generator=gen)
        cond = mix_conditions(self.conditioner.cond(labels), self.conditioner.uncond(size), drop)
        return Batch(x0, t.to(self.device), noise.to(self.device), {k: v.to(self.device) for k, v in cond.items()})

    def batches(self, seed: int, count: int, size: int) -> list[Batch]:
        return [self.batch(seed, i, size) for i in range(count)]

    def loss(self, model, batch: Batch) -> torch.Tensor:
        """The run's training loss (mean over the batch), e.g. DDPM's hybrid loss or the flow-matching MSE."""
        return self.objective.training_losses(model, batch.x0, batch.t, batch.noise, batch.cond)["loss"].mean()

    def model_inputs(self, model, batch: Batch) -> tuple[tuple, dict]:
        """(args, kwargs) of one model forward on the noised batch (used to count FLOPs)."""
        captured = {}

        def grab(module, args, kwargs):
            captured.setdefault("call", (args, kwargs))

        handle = model.register_forward_pre_hook(grab, with_kwargs=True)
        try:
            with torch.no_grad():
                self.loss(model, batch)
        finally:
            handle.remove()
        return captured["call"]
