"""`coco-captions`: MS-COCO captions from your local copy, for the Prefix-diffusion paper presets.

`data.path` is a COCO root holding `annotations/captions_{train,val}2017.json` and the `train2017/`, `val2017/`
image folders (as cocodataset.org ships them). One item per caption, as ClipCap and Prefix-diffusion train: (token
ids (seq_len,), picture (3, image_size, image_size) in [-1, 1], the shorter side resized (bicubic) and centre-
cropped). data.split=test reads val2017 (the Karpathy test split is not part of COCO's release); its reference
captions are all captions of each picture, for BLEU-4 in `ditk sample`'s report (no class words: COCO has none).
"""

from __future__ import annotations

import json
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import ConfigError
from ..registry import DATASETS
from .digits_caption import load_tokenizer
from .sampler import split_index


@dataclass
class CocoCaptionsConfig:
    path: str = ""  # COCO root: annotations/captions_train2017.json, train2017/ (and the val2017 pair)
    split: str = "train"  # train (train2017) | test (val2017)
    image_size: int = 224  # pictures are stored at this size (the CLIP encoder resizes again to its own)
    seq_len: int = 32  # caption tokens, [CLS]/[SEP] included; longer captions are truncated (ending in [SEP])
    tokenizer_path: str = ""  # empty: the shipped all-MiniLM-L6-v2 (BERT uncased) tokenizer


class CocoCaptions(torch.utils.data.Dataset):
    modality = "caption"
    num_classes = 0
    class_names: list = []

    def __init__(self, cfg: CocoCaptionsConfig):
        if cfg.split not in ("train", "test"):
            raise ConfigError(f"data.split '{cfg.split}' is not one of train, test")
        name = "train2017" if cfg.split == "train" else "val2017"
        root = Path(cfg.path)
        ann = root / "annotations" / f"captions_{name}.json"
        if not cfg.path or not ann.is_file():
            raise ConfigError(f"no COCO captions at '{ann}': set data.path to a COCO root with annotations/ and {name}/")
        raw = json.loads(ann.read_text())
        files = {im["id"]: root / name / im["file_name"] for im in raw["images"]}
        self.items = [(a["image_id"], a["caption"].strip()) for a in sorted(raw["annotations"], key=lambda a: a["id"])]
        by_image = defaultdict(list)
        for image_id, caption in self.items:
            by_image[image_id].append(caption)
        self.image_ids = sorted(by_image)
        self.files, self.references = files, [by_image[i] for i in self.image_ids]
        self.tokenizer = load_tokenizer(cfg.tokenizer_path)
        self.seq_len, self.image_size = int(cfg.seq_len), int(cfg.image_size)
        self.shape = (self.seq_len,)
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.items)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def picture(self, image_id: int) -> torch.Tensor:
        from PIL import Image

        image = Image.open(self.files[image_id]).convert("RGB")
        s = self.image_size / min(image.size)
        image = image.resize((max(self.image_size, round(image.size[0] * s)), max(self.image_size, round(image.size[1] * s))),
                             Image.BICUBIC)
        left, top = (image.size[0] - self.image_size) // 2, (image.size[1] - self.image_size) // 2
        image = image.crop((left, top, left + self.image_size, top + self.image_size))
        return torch.from_numpy(np.asarray(image, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0

    def __getitem__(self, item):
        index, _ = split_index(item, self.epoch)
        image_id, caption = self.items[index]
        ids = self.tokenizer(caption, padding="max_length", truncation=True, max_length=self.seq_len,
                             return_tensors="pt")["input_ids"][0]
        return ids.long(), self.picture(image_id)

    def reference_items(self, num: int):
        images = torch.stack([self.picture(i) for i in self.image_ids[:num]])
        return images, self.references[:num], None, None


@DATASETS.register("coco-captions", config=CocoCaptionsConfig)
def build_coco_captions(cfg) -> CocoCaptions:
    """MS-COCO 2017 captions from a local folder (one item per caption), for captioning."""
    return CocoCaptions(cfg)


build_coco_captions.modality = "caption"
