"""MusicCM (Fei et al. 2024, "Music Consistency Models", arXiv 2404.13358): consistency distillation of a
text-to-music flow teacher with its guidance baked in, plus an adversarial loss; 4-step sampling; long clips.

The paper's objective (no code was published; equations as the paper writes them, in ditk's notation):
  - latent consistency distillation (LCM): the student f_θ(z_{t_{n+k}}, c, t_{n+k}) matches the EMA target
    f_θ⁻(ẑ^{Ψ,w}_{t_n}, c, t_n), ẑ^{Ψ,w}_{t_n} = one step of the teacher's ODE solver Ψ with classifier-free guidance
    at a FIXED scale w = 2 (no w-embedding; the student is sampled without CFG), target EMA rate 0.95:
        L_distill = d(f_θ(z_{t_{n+k}}), f_θ⁻(ẑ^{Ψ,w}_{t_n}))
    This is ditk's `consistency` method (ditk.distill.consistency), which this class extends and reuses unchanged:
    for a rectified-flow teacher f(x, t) = x − t v(x, t) (boundary condition f(x, 0) = x exactly) and the solver
    is flow Euler (DDIM's counterpart; MusicCM's teacher MusicLDM is a DDPM model sampled with DDIM).
  - adversarial loss: a discriminator with a frozen pre-trained audio feature network and trainable heads,
    hinge loss and an R1 penalty on real data (ditk.distill.discriminator: the equations and the choices);
    the generator's input to it is the student's x̂0 = f_θ(z_{t_{n+k}}):
        L = L_adv + λ · L_distill,   λ = 3      (distill_weight 3, adv_weight 1)
  - long music: multi-diffusion over overlapping windows: ditk's long-clip sampler (ditk.audio.long), which works
    with any solver, so `ditk sample runs/<student> --duration 60` samples the student's 4 `lcm` steps on a long
    canvas.

Each training step: (1) the consistency pair (online, target) as the consistency method computes it; (2) one
discriminator step on real data x0 and the detached online x̂0 (its own AdamW; heads and optimizer state are
saved in state.pt, so a resumed run continues exactly); (3) the generator loss
    loss = distill_weight · d(online, target) + adv_weight · L_adv(online)
which the training loop back-propagates into the student. The teacher is frozen and never written.

Choices where the paper is silent: the feature network and heads (see ditk.distill.discriminator); R1 weight γ = 1
(`r1_weight`; StyleGAN's range is 0.1–10 depending on the data); the heads' learning rate = the student's; one
discriminator step per generator step; the adversarial term sees only the online x̂0 of the consistency pair
(ADD's fake samples); the teacher's solver is flow Euler (DDIM's counterpart for a rectified flow).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import List

import torch

from ..errors import ConfigError
from ..registry import DISTILL_METHODS
from .consistency import Consistency, ConsistencyConfig, distance
from .discriminator import (Discriminator, FeatureNetwork, evenly_spaced_blocks, hinge_d_loss, hinge_g_loss,
                            r1_penalty)


@dataclass
class MusicCMConfig(ConsistencyConfig):
    num_ddim_timesteps: int = 50  # LCM's skip grid (MusicCM distils with LCM's recipe)
    guidance_scale: float = 2.0  # MusicCM: the teacher's CFG at w = 2, baked into the student
    teacher_solver: str = "euler"  # flow Euler = DDIM for a rectified flow (MusicCM: DDIM on MusicLDM)
    distill_weight: float = 3.0  # MusicCM: L = L_adv + 3 L_distill
    adv_weight: float = 1.0  # 0 = plain consistency distillation (no discriminator)
    r1_weight: float = 1.0  # γ of (γ / 2) R1 (the paper gives none; our choice)
    features: str = "teacher"  # feature network: teacher (the frozen FluxMusic teacher at t = 0) | an A-JEPA run
    feature_blocks: List[int] = field(default_factory=list)  # its blocks read by the heads; [] = 4 evenly spaced
    head_hidden: int = 256  # width of each discriminator head
    disc_lr: float = 0.0  # the heads' AdamW learning rate (0: optim.lr)
    disc_betas: List[float] = field(default_factory=lambda: [0.0, 0.99])  # StyleGAN2's Adam betas for D


def _is_audio(data_cfg) -> bool:
    return "hop_length" in data_cfg and "sample_rate" in data_cfg


def load_feature_run(source: str, device=None):
    """(frozen A-JEPA model, its run config) of an A-JEPA run or checkpoint (the target encoder is in `model`)."""
    from ..build import build_model
    from ..config import load_run_config
    from ..runs import load_weights, resolve_checkpoint

    run_dir, ckpt = resolve_checkpoint(Path(source))
    cfg = load_run_config(run_dir)
    model = build_model(cfg)
    model.load_state_dict(load_weights(ckpt, "model"))
    model.eval().requires_grad_(False)
    return (model.to(device) if device is not None else model), cfg


def check_feature_run(source: str, student_cfg, teacher_cfg) -> int:
    """Refuse an A-JEPA feature run that does not see the student's windows; returns its encoder depth."""
    from ..audio.mel import mel_config_from
    from ..config import load_run_config
    from ..runs import resolve_checkpoint

    path = Path(source)
    if not ((path / "config.yaml").is_file() or (path / "state.pt").is_file()):
        raise ConfigError(f"distill.features '{source}' is neither 'teacher' nor a ditk run: pass distill.features=teacher "
                          f"or an A-JEPA run (ditk train a-jepa-tiny)")
    cfg = load_run_config(resolve_checkpoint(path)[0])
    if cfg.model.name != "a-jepa":
        raise ConfigError(f"distill.features {source} is a '{cfg.model.name}' run: the discriminator's feature network "
                          f"must be an A-JEPA run (or distill.features=teacher)")
    mine = tuple(int(student_cfg.model[k]) for k in ("in_channels", "input_size", "frames"))
    theirs = tuple(int(cfg.model[k]) for k in ("in_channels", "input_size", "frames"))
    if mine != theirs or mel_config_from(cfg.data) != mel_config_from(teacher_cfg.data):
        raise ConfigError(f"distill.features {source} sees {theirs} (channels, mel bins, frames) windows of another "
                          f"front end than the student's {mine}: train the A-JEPA run on the teacher's data settings "
                          f"(or distill.features=teacher)")
    return int(cfg.model.depth)


@DISTILL_METHODS.register("musiccm", config=MusicCMConfig,
                          help="MusicCM: consistency distillation (guidance w baked in) + adversarial loss on audio features")
class MusicCM(Consistency):
    objectives = ("rectified-flow",)  # a FluxMusic (flow) teacher

    def __init__(self, options, objective, cfg):
        super().__init__(options, objective, cfg)
        for key in ("distill_weight", "adv_weight", "r1_weight"):
            if float(options[key]) < 0:
                raise ConfigError(f"distill.{key} must be >= 0, got {options[key]}")
        if int(options.head_hidden) < 1:
            raise ConfigError(f"distill.head_hidden must be >= 1, got {options.head_hidden}")
        if len(options.disc_betas) != 2:
            raise ConfigError(f"distill.disc_betas must be two numbers, got {list(options.disc_betas)}")
        self.features = None
        self.disc = None
        self.disc_opt = None

    @classmethod
    def check(cls, options, cfg, teacher_cfg) -> None:
        super().check(options, cfg, teacher_cfg)
        if not _is_audio(teacher_cfg.data):
            raise ConfigError(f"distill.method=musiccm distils an audio teacher, but {options.teacher} was trained on "
                              f"'{teacher_cfg.data.name}' (no audio front end): use a FluxMusic run (ditk train "
                              f"tones-fluxmusic) or another distill.method")
        if cfg.sample.solver != "lcm" or float(cfg.sample.cfg_scale) != 1.0:
            raise ConfigError(f"a MusicCM student samples with the lcm solver and no CFG (w is baked in), but sample.solver="
                              f"{cfg.sample.solver} sample.cfg_scale={cfg.sample.cfg_scale}: set sample.solver=lcm "
                              f"sample.steps=4 sample.cfg_scale=1 (as the tones-musiccm preset does)")
        if str(options.features) == "teacher":
            m = teacher_cfg.model
            depth = int(m.depth_double) + int(m.depth_single) if "depth_double" in m else int(m.get("depth", 0))
        else:
            depth = check_feature_run(str(options.features), cfg, teacher_cfg)
        bad = [int(i) for i in options.feature_blocks if not 0 <= int(i) < depth]
        if bad:
            raise ConfigError(f"distill.feature_blocks {bad} out of range: the feature network has blocks 0..{depth - 1}")

    # -- the discriminator ------------------------------------------------------------------------------------------

    def attach(self, ema=None, conditioner=None, device=None, run_dir=None) -> None:
        super().attach(ema=ema, conditioner=conditioner, device=device, run_dir=run_dir)
        opts = self.options
        if float(opts.adv_weight) == 0:
            return
        if str(opts.features) == "teacher":
            net, patch, dim = self.teacher, int(self.teacher.patch_size), int(self.teacher.hidden_size)
            zero = self.base.model_time(torch.zeros(1))

            def call(model, x, cond):  # the teacher on the clean spectrogram (model time 0)
                return model(x, zero.to(x.device).expand(len(x)), **cond)
        else:
            model, feature_cfg = load_feature_run(str(opts.features), device)
            net, patch, dim = model.target_encoder, int(feature_cfg.model.patch_size), int(feature_cfg.model.hidden_size)

            def call(model, x, cond):  # A-JEPA's target encoder: no text
                return model(x)
        ids = list(opts.feature_blocks) or evenly_spaced_blocks(len(net.blocks))
        self.features = FeatureNetwork(net, ids, patch, dim, call)
        # the heads' projection term reads the pooled text embedding (FluxMusic's vector_in input)
        cond_dim = int(self.teacher.vector_in.in_layer.in_features) if hasattr(self.teacher, "vector_in") else 0
        self.disc = Discriminator([dim] * len(ids), int(opts.head_hidden), cond_dim)
        if device is not None:
            self.disc.to(device)
        lr = float(opts.disc_lr) or float(self.run_cfg.optim.lr)
        self.disc_opt = torch.optim.AdamW(self.disc.parameters(), lr=lr, betas=tuple(float(b) for b in opts.disc_betas),
                                          weight_decay=0.0)

    def state_dict(self) -> dict:
        if self.disc is None:
            return {}
        return {"disc": {k: v.detach().cpu() for k, v in self.disc.state_dict().items()},
                "disc_opt": self.disc_opt.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if self.disc is not None and "disc" in state:  # none saved: the run had adv_weight 0 until now
            self.disc.load_state_dict(state["disc"])
            self.disc_opt.load_state_dict(state["disc_opt"])

    def discriminator_step(self, real: torch.Tensor, fake_feats: list, cond: dict) -> tuple:
        """One AdamW step of the heads on L_D = hinge + (γ/2) R1; returns (hinge, R1) per sample, detached."""
        c = cond.get("pooled")
        with torch.no_grad():
            real_feats = self.features(real, cond)
        real_feats = [h.detach().requires_grad_(True) for h in real_feats]
        real_logits = self.disc(real_feats, c)
        fake_logits = self.disc([h.detach() for h in fake_feats], c)
        hinge = hinge_d_loss(real_logits, fake_logits)
        r1 = r1_penalty(real_logits, real_feats)
        loss = (hinge + 0.5 * float(self.options.r1_weight) * r1).mean()
        self.disc_opt.zero_grad(set_to_none=True)
        loss.backward()
        self.disc_opt.step()
        self.disc_opt.zero_grad(set_to_none=True)  # free them (the generator's term below adds none)
        return hinge.detach(), r1.detach()

    def training_losses(self, model, x0, t, noise, model_kwargs=None) -> dict:
        cond = model_kwargs or {}
        online, target = self.consistency_pair(model, x0, t, noise, cond)
        l_distill = distance(online.float(), target.float(), self.loss, self.huber_c)
        out = {"distill": l_distill.detach()}
        loss = float(self.options.distill_weight) * l_distill
        if self.disc is not None:
            fake_feats = self.features(online, cond)  # with the graph back to the student
            out["disc_hinge"], out["r1"] = self.discriminator_step(x0, fake_feats, cond)
            self.disc.requires_grad_(False)  # the generator's term trains the student only, not the heads
            adv = hinge_g_loss(self.disc(fake_feats, cond.get("pooled")).float())
            self.disc.requires_grad_(True)
            loss = loss + float(self.options.adv_weight) * adv
            out["adv"] = adv.detach()
        out["loss"] = loss
        return out
