"""Reflow (Liu et al., ICLR 2023, "Flow Straight and Fast"; InstaFlow, SlimFlow): a 2-rectified flow trained on
(noise, teacher-ODE endpoint) pairs, for rectified-flow teachers.

1. Pairs: for noise z ~ N(0, I) (and a class label y), the teacher's ODE solution x = ODE_teacher(z | y) with its
   sampler (`pair_solver`, `pair_steps`, guidance `guidance_scale` fixed: InstaFlow's text-conditional reflow
   uses guided pairs). They are generated ONCE into `<student run>/reflow-pairs/chunk-NNNNN.safetensors`, chunk i
   from its own seed (run.seed, i), each written atomically: an interrupted generation resumes with the missing
   chunks, and a resumed training run reuses them.
2. Training: the student (initialised from the teacher, as 2-RF from 1-RF) regresses the straight interpolation
   z_t = (1 − t) x + t z onto its constant velocity z − x, t from the objective's time distribution, with the
   pair's label (no label dropout: the guidance is in the pairs). Which pairs a step uses is drawn from the step's
   generator (the loop's `sample_time` draw carries (t, pair index) per row), so resumes are exact.

The straighter flow samples with few Euler steps (`ditk sample runs/<student> --steps 1`).

3. Optional one-step distillation afterwards (InstaFlow §3.2 / Rectified Flow §2.3 "distillation", `one_step_after`
   = S >= 0): from training step S on (0: a run that starts from a finished reflow run, `distill.student=runs/<it>`), the same run trains the one-step map instead, x̂ = z − v_θ(z, 1) (one Euler
   step from t = 1 to 0, what `ditk sample --steps 1` computes), with the L2 loss ‖x̂ − x‖² on the teacher pairs
   (z, x). InstaFlow's LPIPS loss is not offered: its VGG / AlexNet weights are not available locally (no
   download at run time), so `one_step_loss=lpips` is a one-line error. Where InstaFlow distils the 2-RF model's
   own pairs we follow the brief of this toolkit: the teacher's pairs already on disk (no second generation).
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..errors import ConfigError
from ..objectives.base import broadcast_to, mean_flat
from ..registry import DISTILL_METHODS
from .base import DistillConfig, Distiller

CHUNK = 256  # pairs per file


@dataclass
class ReflowConfig(DistillConfig):
    num_pairs: int = 8192  # (noise, endpoint) pairs generated once (InstaFlow: 4M for SD; SlimFlow CIFAR: 500k)
    pair_solver: str = "euler"  # the teacher's sampler for the pairs (rectified-flow solvers)
    pair_steps: int = 50  # ... and its step count
    guidance_scale: float = 1.0  # teacher CFG w of the pairs (fixed; 1 = none)
    one_step_after: int = -1  # >= 0: from this training step on, one-step distillation on the pairs (InstaFlow)
    one_step_loss: str = "l2"  # l2 (LPIPS: its weights are not available locally)


def chunk_path(folder: Path, index: int) -> Path:
    return folder / f"chunk-{index:05d}.safetensors"


@DISTILL_METHODS.register("reflow", config=ReflowConfig,
                          help="2-rectified flow on (noise, teacher ODE endpoint) pairs generated once, on disk")
class Reflow(Distiller):
    objectives = ("rectified-flow",)

    def __init__(self, options, objective, cfg):
        super().__init__(options, objective, cfg)
        if int(options.num_pairs) < 1 or int(options.pair_steps) < 1:
            raise ConfigError("distill.num_pairs and distill.pair_steps must be >= 1")
        if options.pair_solver not in objective.solvers or options.pair_solver == "lcm":
            raise ConfigError(f"distill.pair_solver={options.pair_solver} is not an ODE solver of the teacher: use one of "
                              f"euler, heun, dpm-solver++, unipc")
        if options.one_step_loss != "l2":
            raise ConfigError(f"distill.one_step_loss={options.one_step_loss} is not available: InstaFlow's LPIPS needs "
                              f"pretrained VGG/AlexNet weights, which are not available locally; use l2")
        if int(options.one_step_after) < -1:
            raise ConfigError("distill.one_step_after must be >= 0 (the step the one-step phase starts), or -1 (none)")
        self.z = self.x = self.y = None
        self.one_step = False

    def attach(self, ema=None, conditioner=None, device=None, run_dir=None) -> None:
        super().attach(ema=ema, conditioner=conditioner, device=device)
        if run_dir is None:
            raise ConfigError("reflow needs the student's run directory to keep its pairs in")
        self.z, self.x, self.y = self.load_pairs(Path(run_dir) / "reflow-pairs", device)

    # -- pairs ----------------------------------------------------------------------------------------------------------

    def labels(self, index: int, n: int) -> Optional[torch.Tensor]:
        """Balanced labels (pair i gets class i mod K), or None for an unconditional teacher."""
        if self.conditioner is None or getattr(self.conditioner, "unconditional", False):
            return None
        first = index * CHUNK
        return torch.arange(first, first + n) % self.conditioner.num_classes

    @torch.no_grad()
    def generate_chunk(self, index: int, n: int, device) -> dict:
        """Pairs index*CHUNK ... of the teacher's ODE, from the chunk's own seeded noise."""
        from ..build import latent_shape
        from ..sampling import sample

        seed = int(self.run_cfg.run.seed) if self.run_cfg is not None else 0
        g = torch.Generator().manual_seed((seed * 1_000_003 + index) % (2**63))
        z = torch.randn((n, *latent_shape(self.teacher)), generator=g)
        y = self.labels(index, n)
        cond = self.conditioner.cond(y.to(device)) if y is not None else {}
        w = float(self.options.guidance_scale)
        uncond = self.conditioner.uncond(n, device) if (y is not None and w != 1.0) else None
        x = sample(self.teacher, self.base, z.to(device), cond, uncond, solver=self.options.pair_solver,
                   steps=int(self.options.pair_steps), cfg_scale=w)
        pairs = {"z": z, "x": x.float().cpu()}
        if y is not None:
            pairs["y"] = y
        return pairs

    def load_pairs(self, folder: Path, device):
        """All pairs, generating the chunks that are not on disk yet."""
        from safetensors.torch import load_file, save_file

        from ..atomic import atomic_path

        total = int(self.options.num_pairs)
        chunks = (total + CHUNK - 1) // CHUNK
        missing = [i for i in range(chunks) if not chunk_path(folder, i).is_file()]
        if missing:
            print(f"[ditk] reflow: generating {len(missing) * CHUNK} of {total} teacher pairs "
                  f"({self.options.pair_solver}, {self.options.pair_steps} steps) -> {folder}", file=sys.stderr, flush=True)
        for i in missing:
            pairs = self.generate_chunk(i, min(CHUNK, total - i * CHUNK), device)
            with atomic_path(chunk_path(folder, i)) as tmp:
                save_file({k: v.contiguous() for k, v in pairs.items()}, str(tmp))
        parts = [load_file(str(chunk_path(folder, i))) for i in range(chunks)]
        z = torch.cat([p["z"] for p in parts]).to(device)
        x = torch.cat([p["x"] for p in parts]).to(device)
        y = torch.cat([p["y"] for p in parts]).to(device) if "y" in parts[0] else None
        return z, x, y

    # -- training -------------------------------------------------------------------------------------------------------

    def sample_time(self, n: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
        """(n, 2) rows (t, pair index): the objective's time and a uniformly drawn pair, from the step's generator."""
        t = self.base.sample_time(n, generator).double()
        index = torch.randint(0, int(self.options.num_pairs), (n,), generator=generator).double()
        return torch.stack([t, index], dim=1)

    def begin_step(self, model, step: int, max_steps: int) -> None:
        """The phase of this step: reflow, or (from one_step_after on) one-step distillation; a function of the step."""
        after = int(self.options.one_step_after)
        self.one_step = 0 <= after <= step

    def training_losses(self, model, x0, t, noise, model_kwargs=None) -> dict:
        """The loop's data batch and noise are not used: the pairs replace them."""
        time, index = t[:, 0].float().to(self.z.device), t[:, 1].long().to(self.z.device)
        z, x = self.z[index], self.x[index]
        cond = self.conditioner.cond(self.y[index]) if self.y is not None else {}
        cond = {k: v.to(z.device) for k, v in cond.items()}
        if self.one_step:  # x̂ = z − v(z, 1): one Euler step from noise, regressed onto the teacher's endpoint
            one = torch.ones(len(z), device=z.device)
            x_hat = z - model(z, self.base.model_time(one), **cond)[:, : x.shape[1]]
            return {"loss": mean_flat((x_hat - x) ** 2)}
        z_t = (1 - broadcast_to(time, x)) * x + broadcast_to(time, x) * z
        out = model(z_t, self.base.model_time(time), **cond)[:, : x.shape[1]]
        return {"loss": mean_flat((z - x - out) ** 2)}
