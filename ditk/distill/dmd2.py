"""DMD2 (Yin et al., NeurIPS 2024, "Improved Distribution Matching Distillation for Fast Image Synthesis";
tianweiy/DMD2 `main/sd_guidance.py`, `main/sd_unified_model.py`), for DDPM and rectified-flow teachers.

- Generator G = the student (initialised from the teacher). It maps pure noise z at the first of its
  `generator_timesteps` (the conditioning timestep; 1-step: one entry) to x̂0 = G(z). Multi-step (e.g. 999, 749,
  499, 249): each training sample picks a stage k and, with **backward simulation**, its input is produced by the
  generator itself (no gradient): x̂0 of stage j re-noised to stage j + 1 with fresh noise, from z up to stage k.
- Distribution matching (DM) loss: noise x̂0 to x_t at t ~ U[min_t, max_t] (DMD2: 2 % .. 98 % of T); the real
  score is the frozen teacher with CFG `real_guidance` (p_real = its x̂0), the fake score a trainable copy of the
  teacher without guidance (p_fake). The DM gradient
      grad = (p_fake − p_real) / mean|x̂0 − p_real|        (per sample, DMD2's normalisation)
  enters as loss_dm = ½ ‖x̂0 − sg(x̂0 − grad)‖² (mean over elements), whose gradient in x̂0 is `grad` (/ elements).
- Two time-scale update rule (TTUR): before every generator step the fake score takes `ratio` (5) steps of its own
  denoising loss on fresh generator samples (its own AdamW, `fake_lr`). The loop steps the generator's optimizer;
  the fake score, its optimizer and their state live in the method (saved in state.pt, so resumes are exact).
- Randomness of the fake-score updates and of backward simulation comes from a per-step seed drawn from the
  step's generator (carried in the loop's `sample_time` rows), so runs resume exactly.

- Optional GAN head (`gan_weight` > 0; DMD2 §4.3, `main/edm/edm_guidance.py`): a classifier on the fake score's
  features of real and generated images, both noised to t ~ U[0, gan_max_t] of the schedule first (DMD2's
  "diffusion GAN", ImageNet: the whole range). Its loss (weight `gan_head_weight`, DMD2 ImageNet 1e-2) joins the
  fake score's denoising loss in each of the `ratio` fake updates (same optimizer, as DMD2's guidance model);
  the generator adds `gan_weight` (DMD2 ImageNet 3e-3) x its adversarial loss. `gan_loss`: `nonsaturating`
  (DMD2's: D softplus(f) + softplus(−r), G softplus(−f)) or `hinge` (D relu(1 − r) + relu(1 + f), G −f).
  The real images are the run's data batches (the `data:` section, defaulted to the teacher's by `ditk distill`).
  Where DMD2 used a UNet we chose: the features are the fake score's middle block output (`gan_block`; a UNet's
  bottleneck is its middle), the head Linear-LayerNorm-SiLU per token, mean over tokens, Linear to one logit
  (DMD2's conv-GroupNorm-SiLU stack pools its 8x8 bottleneck the same way).

Not implemented: the regression loss of DMD (v1). Where DMD2 has no ε-parameterised recipe we chose: the fake
score is trained on ε (DDPM) or velocity (flow) with the objective's MSE, without the learned-variance term.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import List, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..errors import ConfigError
from ..objectives.base import broadcast_to, mean_flat
from ..registry import DISTILL_METHODS
from .base import DistillConfig, Distiller, forward_process, guided, objective_kind


@dataclass
class DMD2Config(DistillConfig):
    # Stages of the generator in the objective's time units (DDPM timesteps 0..T-1, or flow t in (0, 1]); one entry =
    # a 1-step generator. DMD2's 4-step SDXL: 999, 749, 499, 249. (For ε-models a 1-step timestep well below T keeps
    # x̂0 = (z − σ ε) / α well conditioned: DMD2's SD 1-step uses 399 / 999.)
    generator_timesteps: List[float] = field(default_factory=lambda: [999.0])
    real_guidance: float = 1.75  # CFG of the real score (DMD2: 1.75 SD1.5, 8 SDXL; ImageNet: none)
    ratio: int = 5  # fake-score updates per generator update (dfake_gen_update_ratio)
    fake_lr: float = 0.0  # the fake score's learning rate (0: optim.lr, as DMD2's equal generator / guidance lr)
    min_t: float = 0.02  # DM-loss times drawn in [min_t, max_t] of the schedule (DMD2: min_step_percent 0.02, ...
    max_t: float = 0.98  # ... max_step_percent 0.98)
    gan_weight: float = 0.0  # generator's GAN loss weight; 0: no GAN head (DMD2 ImageNet gen_cls_loss_weight 3e-3)
    gan_head_weight: float = 1e-2  # the head's classification loss weight in the fake update (DMD2 cls_loss_weight)
    gan_loss: str = "nonsaturating"  # nonsaturating (DMD2's softplus) | hinge
    gan_max_t: float = 1.0  # real and fake images are noised to t ~ U[0, gan_max_t] before the head (DMD2: 1000/1000)
    gan_block: int = -1  # the fake score's block whose output feeds the head; -1: the middle block (depth // 2)


GAN_LOSSES = ("nonsaturating", "hinge")


class GANHead(nn.Module):
    """Block features (N, T, D) -> one realism logit (N,): Linear-LayerNorm-SiLU per token, token mean, Linear."""

    def __init__(self, hidden_size: int):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.LayerNorm(hidden_size), nn.SiLU())
        self.out = nn.Linear(hidden_size, 1)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.out(self.body(h).mean(dim=1)).squeeze(1)


def discriminator_loss(real: torch.Tensor, fake: torch.Tensor, kind: str) -> torch.Tensor:
    """(N,) loss of the head on real and generated logits: DMD2's softplus(f) + softplus(-r), or the hinge loss."""
    if kind == "hinge":
        return torch.relu(1 - real) + torch.relu(1 + fake)
    return F.softplus(fake) + F.softplus(-real)


def generator_gan_loss(fake: torch.Tensor, kind: str) -> torch.Tensor:
    """(N,) the generator's adversarial loss: DMD2's non-saturating softplus(-f), or hinge's -f."""
    return -fake if kind == "hinge" else F.softplus(-fake)


def dm_gradient(x: torch.Tensor, p_real: torch.Tensor, p_fake: torch.Tensor) -> torch.Tensor:
    """DMD2's distribution-matching gradient (p_fake − p_real) / mean|x − p_real| per sample; 0 where undefined."""
    norm = (x - p_real).abs().flatten(1).mean(1).view(-1, *([1] * (x.ndim - 1)))
    return torch.nan_to_num((p_fake - p_real) / norm)


def dm_loss(x: torch.Tensor, grad: torch.Tensor) -> torch.Tensor:
    """½ ‖x − sg(x − grad)‖² per sample (mean over elements): its gradient in x is grad / elements."""
    return 0.5 * mean_flat((x - (x - grad).detach()) ** 2)


@DISTILL_METHODS.register("dmd2", config=DMD2Config,
                          help="DMD2: distribution matching with a trainable fake score, TTUR, backward simulation")
class DMD2(Distiller):
    data_need = "real images (the GAN head's, distill.gan_weight > 0) and the generator's class labels"
    def __init__(self, options, objective, cfg):
        super().__init__(options, objective, cfg)
        self.kind = objective_kind(objective)
        self.stages = [float(s) for s in options.generator_timesteps]
        top = objective.num_timesteps - 1 if self.kind == "ddpm" else 1.0
        if not self.stages or any(not 0 < s <= top for s in self.stages) or self.stages != sorted(self.stages, reverse=True):
            raise ConfigError(f"distill.generator_timesteps must decrease within (0, {top}], got {self.stages}")
        if int(options.ratio) < 1:
            raise ConfigError("distill.ratio must be >= 1")
        if not 0 <= options.min_t < options.max_t <= 1:
            raise ConfigError("distill.min_t and max_t must satisfy 0 <= min_t < max_t <= 1")
        if options.gan_loss not in GAN_LOSSES:
            raise ConfigError(f"unknown distill.gan_loss '{options.gan_loss}': use one of {', '.join(GAN_LOSSES)}")
        if options.gan_weight < 0 or options.gan_head_weight < 0 or not 0 < options.gan_max_t <= 1:
            raise ConfigError("distill.gan_weight and gan_head_weight must be >= 0 and 0 < gan_max_t <= 1")
        self.gan = float(options.gan_weight) > 0
        self.fake = None
        self.fake_opt = None
        self.head = None
        self._features = None

    @classmethod
    def check(cls, options, cfg, teacher_cfg) -> None:
        super().check(options, cfg, teacher_cfg)
        if float(options.real_guidance) != 1.0 and int(teacher_cfg.model.get("num_classes", 0) or 0) == 0 \
                and cfg.conditioner.name == "class":
            raise ConfigError(f"distill.real_guidance={options.real_guidance} needs a conditional teacher, but "
                              f"{options.teacher} is unconditional: set distill.real_guidance=1")
        cls.check_sampler(options, cfg)

    @classmethod
    def check_sampler(cls, options, cfg) -> None:
        """A DDPM student sampled with `lcm` must have been trained on the LCM grid of its step count: then the
        sampler's re-noising is the generator's backward simulation."""
        if cfg.sample.solver != "lcm" or cfg.objective.name != "ddpm":
            return
        from ..build import build_objective

        stages = [int(round(s)) for s in options.generator_timesteps]
        grid = build_objective(cfg).make_scheduler("lcm", len(stages), **dict(cfg.sample.solver_options)).timesteps
        if grid.tolist() != stages:
            raise ConfigError(f"distill.generator_timesteps={stages} differ from the lcm sampler's {len(stages)}-step "
                              f"grid {grid.tolist()}: set distill.generator_timesteps={grid.tolist()}")

    def attach(self, ema=None, conditioner=None, device=None, run_dir=None) -> None:
        super().attach(ema=ema, conditioner=conditioner, device=device, run_dir=run_dir)
        # The fake score starts as the teacher (DMD2) and is trained by the method's own optimizer.
        self.fake = copy.deepcopy(self.teacher).requires_grad_(True)
        params = list(self.fake.parameters())
        if self.gan:  # the head reads a block of the fake score and trains with it (DMD2's cls_pred_branch)
            from ..hooks import blocks

            stack = blocks(self.fake)
            index = int(self.options.gan_block) if int(self.options.gan_block) >= 0 else len(stack) // 2
            if index >= len(stack):
                raise ConfigError(f"distill.gan_block={index} but the fake score has {len(stack)} blocks")
            stack[index].register_forward_hook(self._keep_features)
            with torch.random.fork_rng(devices=[]):  # seeded, without moving the loop's global RNG
                torch.manual_seed(int(self.run_cfg.run.seed) if self.run_cfg is not None else 0)
                self.head = GANHead(self._hidden_size(stack[index])).to(device)
            params += list(self.head.parameters())
        lr = float(self.options.fake_lr) or float(self.run_cfg.optim.lr)
        betas = tuple(self.run_cfg.optim.betas)
        self.fake_opt = torch.optim.AdamW(params, lr=lr, betas=betas,
                                          weight_decay=float(self.run_cfg.optim.weight_decay))

    @staticmethod
    def _hidden_size(block) -> int:
        widths = [m.normalized_shape[0] for m in block.modules() if isinstance(m, nn.LayerNorm)]
        if not widths:
            raise ConfigError(f"DMD2's GAN head cannot tell the width of a {type(block).__name__}: set distill.gan_weight=0")
        return int(widths[0])

    def _keep_features(self, module, inputs, output):
        self._features = output[0] if isinstance(output, (tuple, list)) else output

    def realism(self, x0, cond, g: torch.Generator) -> torch.Tensor:
        """(N,) head logits of images x0: noised to t ~ U[0, gan_max_t] (diffusion GAN), through the fake score."""
        n = len(x0)
        u = float(self.options.gan_max_t) * torch.rand(n, generator=g, dtype=torch.float64)
        t = (u * (self.base.num_timesteps - 1)).round().long() if self.kind == "ddpm" else u.float().clamp(min=1e-4)
        t = t.to(x0.device)
        x_t = self.noised(x0, t, torch.randn(x0.shape, generator=g).to(x0.device))
        self.fake(x_t, self.base.model_time(t), **cond)
        features, self._features = self._features, None
        return self.head(features.float())

    def state_dict(self) -> dict:
        state = {"fake": {k: v.detach().cpu() for k, v in self.fake.state_dict().items()},
                 "fake_opt": self.fake_opt.state_dict()}
        if self.head is not None:
            state["gan_head"] = {k: v.detach().cpu() for k, v in self.head.state_dict().items()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self.fake.load_state_dict(state["fake"])
        if self.head is not None:
            if "gan_head" not in state:
                raise ConfigError("this checkpoint was trained without DMD2's GAN head: resume with distill.gan_weight=0")
            self.head.load_state_dict(state["gan_head"])
        self.fake_opt.load_state_dict(state["fake_opt"])

    # -- times --------------------------------------------------------------------------------------------------------

    def stage_time(self, k: torch.Tensor) -> torch.Tensor:
        t = torch.tensor(self.stages, dtype=torch.float64, device=k.device)[k]
        return t.round().long() if self.kind == "ddpm" else t.float()

    def random_time(self, n: int, g: torch.Generator, device) -> torch.Tensor:
        """DM / denoising times in [min_t, max_t] of the schedule."""
        u = self.options.min_t + (self.options.max_t - self.options.min_t) * torch.rand(n, generator=g, dtype=torch.float64)
        if self.kind == "ddpm":
            return (u * (self.base.num_timesteps - 1)).round().long().to(device)
        return u.float().to(device)

    def sample_time(self, n: int, generator: Optional[torch.Generator] = None, device=None) -> torch.Tensor:
        """(n, 3) rows: the generator stage of each sample, its DM time draw u in [0, 1), and the step's seed."""
        stage = torch.randint(0, len(self.stages), (n,), generator=generator).double()
        u = torch.rand(n, generator=generator, dtype=torch.float64)
        seed = torch.randint(0, 2**52, (1,), generator=generator).double().expand(n)
        return torch.stack([stage, u, seed], dim=1)

    # -- the pieces ---------------------------------------------------------------------------------------------------

    def x0_pred(self, model, x, t, cond, scale: float = 1.0) -> torch.Tensor:
        uncond = self.uncond_like(cond, len(x)) if scale != 1.0 else None
        out = guided(model, x, self.base.model_time(t), cond, uncond, scale, x.shape[1], self.cfg_channels)[:, : x.shape[1]]
        if self.kind == "ddpm":
            return self.base.predict_xstart_from_eps(x, t, out)
        return x - broadcast_to(t, x) * out

    def noised(self, x0, t, noise):
        return self.base.q_sample(x0, t, noise) if self.kind == "ddpm" else self.base.interpolate(x0, t, noise)

    def generate(self, model, z, stage: torch.Tensor, cond, g: torch.Generator, grad: bool = True) -> torch.Tensor:
        """x̂0 of the generator at each sample's stage, the input made by backward simulation (no gradient)."""
        x = z
        with torch.no_grad():
            for k in range(int(stage.max()) if len(stage) else 0):
                active = stage > k  # samples that still have to pass stage k
                t_k = self.stage_time(torch.full_like(stage, k))
                x0 = self.x0_pred(model, x, t_k, cond)
                noise = torch.randn(x.shape, generator=g).to(x.device)
                renoised = self.noised(x0, self.stage_time(torch.full_like(stage, k + 1)), noise)
                x = torch.where(broadcast_to(active, x).bool(), renoised, x)
        with torch.enable_grad() if grad else torch.no_grad():
            return self.x0_pred(model, x, self.stage_time(stage), cond)

    def fake_update(self, model, n: int, shape, cond, g: torch.Generator, device, real=None):
        """One denoising step of the fake score on fresh generator samples (plus, with the GAN head, its
        classification loss on `real` images and those samples); returns (denoising loss, head loss)."""
        z = torch.randn((n, *shape), generator=g).to(device)
        stage = torch.randint(0, len(self.stages), (n,), generator=g).to(device)
        x0 = self.generate(model, z, stage, cond, g, grad=False)
        t = self.random_time(n, g, device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        x_t, target = forward_process(self.base, x0, t, noise)
        out = self.fake(x_t, self.base.model_time(t), **cond)[:, : x0.shape[1]]
        loss = mean_flat((out - target) ** 2).mean()
        head_loss = torch.zeros(())
        if self.gan:
            head_loss = discriminator_loss(self.realism(real, cond, g), self.realism(x0, cond, g),
                                           str(self.options.gan_loss)).mean()
            loss = loss + float(self.options.gan_head_weight) * head_loss
        self.fake_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.fake_opt.step()
        return float(loss.detach()), float(head_loss.detach())

    def training_losses(self, model, x0, t, noise, model_kwargs=None) -> dict:
        """`noise` is the generator's input z; the data batch x0 is used only by the GAN head (the real images)."""
        cond = model_kwargs or {}
        stage, u, seed = t[:, 0].long().to(noise.device), t[:, 1], int(t[0, 2])
        g = torch.Generator().manual_seed(seed)
        fake_loss = head_loss = 0.0
        for _ in range(int(self.options.ratio)):  # TTUR: the fake score first follows the current generator
            denoise, head = self.fake_update(model, len(noise), noise.shape[1:], cond, g, noise.device, real=x0)
            fake_loss, head_loss = fake_loss + denoise, head_loss + head
        x = self.generate(model, noise, stage, cond, g)
        lo, hi = float(self.options.min_t), float(self.options.max_t)
        u = (lo + (hi - lo) * u).to(noise.device)
        t_dm = (u * (self.base.num_timesteps - 1)).round().long() if self.kind == "ddpm" else u.float()
        eps = torch.randn(x.shape, generator=g).to(x.device)
        with torch.no_grad():
            x_t = self.noised(x.detach(), t_dm, eps)
            p_real = self.x0_pred(self.teacher, x_t, t_dm, cond, float(self.options.real_guidance))
            p_fake = self.x0_pred(self.fake, x_t, t_dm, cond)
            grad = dm_gradient(x.detach(), p_real, p_fake)
        loss = dm_loss(x, grad)
        ratio = int(self.options.ratio)
        out = {"fake_loss": torch.full_like(loss, fake_loss / ratio)}
        if self.gan:  # the head judges the generator's images through the fake score (its weights get no step here)
            self.fake.requires_grad_(False)  # gradients to the generator only
            self.head.requires_grad_(False)
            try:
                gan = generator_gan_loss(self.realism(x, cond, g), str(self.options.gan_loss))
            finally:
                self.fake.requires_grad_(True)
                self.head.requires_grad_(True)
            loss = loss + float(self.options.gan_weight) * gan
            out.update(gan_loss=gan.detach(), head_loss=torch.full_like(gan, head_loss / ratio))
        return {"loss": loss, **out}
