"""Registry entry of A-JEPA (the model lives in `ditk.audio.ajepa`; this module makes `model.name: a-jepa` work)."""

from __future__ import annotations

from ..audio.ajepa import AJEPA, AJEPAConfig
from ..config import section_kwargs
from ..registry import MODELS


@MODELS.register("a-jepa", config=AJEPAConfig,
                 help="A-JEPA (context encoder, EMA target encoder, predictor on log-mel patches; self-supervised)")
def build_ajepa(cfg) -> AJEPA:
    """A-JEPA (context encoder, EMA target encoder, predictor on log-mel patches; self-supervised)."""
    return AJEPA(AJEPAConfig(**section_kwargs(cfg, AJEPAConfig)))
