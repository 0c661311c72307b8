"""Config sections -> objects, through the registries. Shared by training and sampling, so both build
exactly the same model, objective, autoencoder and conditioner from a config."""

from __future__ import annotations

from omegaconf import DictConfig

from .config import section_obj
from .errors import ConfigError
from .registry import AUTOENCODERS, CONDITIONERS, DATASETS, MODELS, OBJECTIVES


def build_model(cfg: DictConfig):
    model = MODELS.build(cfg.model.name, section_obj(cfg.model))
    if cfg.model.get("guidance_embed", False):  # an LCM-style student: the CFG scale is a model input
        from .models.guidance import add_guidance_embedding

        add_guidance_embedding(model)
    return model


def build_objective(cfg: DictConfig):
    return OBJECTIVES.build(cfg.objective.name, section_obj(cfg.objective))


def build_autoencoder(cfg: DictConfig):
    return AUTOENCODERS.build(cfg.autoencoder.name, section_obj(cfg.autoencoder))


def build_conditioner(cfg: DictConfig, num_classes: int, class_names=None, model=None):
    # The model decides whether there are classes at all: one built with model.num_classes=0 has no label table,
    # so the class conditioner gets 0 classes (unconditional: no `y`) whatever labels the data set carries.
    if model is not None and cfg.conditioner.name == "class" and getattr(model, "num_classes", None) == 0:
        num_classes, class_names = 0, None
    return CONDITIONERS.build(cfg.conditioner.name, section_obj(cfg.conditioner), num_classes, class_names)


def build_dataset(cfg: DictConfig):
    return DATASETS.build(cfg.data.name, section_obj(cfg.data))


def check_model_objective(model, objective, cfg: DictConfig) -> None:
    # A model with extra variance channels may serve an objective that ignores them (DiT-MoE trains
    # rectified flow with 2C outputs and uses the first C); the reverse cannot work.
    if objective.learn_sigma and not model.learn_sigma:
        raise ConfigError(
            f"objective '{cfg.objective.name}' with a learned variance needs model.learn_sigma=true: set it, "
            "or objective.variance=fixed_small"
        )


def latent_shape(model) -> tuple:
    """Shape of one model input (C, H, W): square unless the model says otherwise (e.g. mel latents)."""
    return tuple(getattr(model, "latent_shape", None) or (model.in_channels, model.input_size, model.input_size))


def check_model_data(model, data_shape: tuple, latent_channels: int, downsample: int, num_classes: int) -> None:
    """The model must accept what the dataset + autoencoder produce; say which key to change if not."""
    if hasattr(model, "check_data"):  # models of non-image data (captions) check their own input
        return model.check_data(data_shape, num_classes)
    c, h, w = data_shape
    want_c, want_size, want_w = latent_channels, h // downsample, w // downsample
    if model.in_channels != want_c:
        raise ConfigError(f"the data gives {want_c}-channel inputs but model.in_channels={model.in_channels}: set model.in_channels={want_c}")
    if model.input_size != want_size:
        raise ConfigError(f"the data gives {want_size}x{want_w} inputs but model.input_size={model.input_size}: set model.input_size={want_size}")
    # The width too: the loop draws noise of the model's window shape (latent_shape), which for models with
    # their own width (mel latents: FluxMusic's `frames`) need not be square.
    model_w = latent_shape(model)[2]
    if model_w != want_w:
        fix = f"set model.frames={want_w}" if hasattr(model, "frames") else "use square data for this model"
        raise ConfigError(f"the data gives {want_size}x{want_w} inputs but the model takes {want_size}x{model_w}: "
                          f"{fix}")
    if getattr(model, "num_classes", 0) and model.num_classes != num_classes:  # text-conditioned models have none
        fix = f"set model.num_classes={num_classes}" + (" (or 0 for an unconditional model)" if num_classes else "")
        raise ConfigError(f"the dataset has {num_classes} classes but model.num_classes={model.num_classes}: {fix}")
