"""`ditk sample` for captioning runs: K captions per image, captions.jsonl, a contact sheet and report.json.

Caption k of image i is drawn from its own generator, seeded by (sample.seed, i, k), for its initial noise and for
every stochastic solver step (the autoregressive baseline: for every token draw), so a caption does not depend on
the batch it was made in. The diffusion captioner samples through the one sampling loop (`ditk.sampling.sample`)
with the objective's step hooks (Diffusion-LM's clamping), any of its DDPM solvers and step counts.

Two inputs: your pictures (`--images`), or, without them, the first `sample.num` digits of the run's held-out
split, whose reference captions give BLEU-4 and class-word accuracy in report.json's `captioning` section.
"""

from __future__ import annotations

import json
import re
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from ..errors import ConfigError
from ..io import list_input_files
from ..runs import save_json
from .metrics import caption_report


def caption_generator(seed: int, image: int, k: int) -> torch.Generator:
    return torch.Generator().manual_seed(((seed * 1_000_003 + image) * 1_000_033 + k) % (2**63))


def _tokenizer(cfg):
    from ..data.digits_caption import load_tokenizer

    return load_tokenizer(str(getattr(cfg.data, "tokenizer_path", "") or ""))


def ids_to_text(tokenizer, ids: torch.Tensor) -> list[str]:
    """Token rows -> captions: everything after [CLS] up to the first [SEP], special tokens dropped."""
    texts = []
    for row in ids.tolist():
        if tokenizer.sep_token_id in row[1:]:
            row = row[: row[1:].index(tokenizer.sep_token_id) + 1]
        text = tokenizer.decode(row, skip_special_tokens=True).strip()
        texts.append(re.sub(r" ([:;,.!?])", r"\1", text))  # WordPiece decoding leaves "six : small"
    return texts


@torch.no_grad()
def caption_images(pipe, images: torch.Tensor, indices: Sequence[int], num_captions: int,
                   progress: bool = False) -> list[list[str]]:
    """`num_captions` captions for each picture (N, C, H, W) in [-1, 1]; `indices` name the pictures in the seeds."""
    from ..sampling import sample

    sc, model, objective = pipe.cfg.sample, pipe.model, pipe.objective
    tokenizer = _tokenizer(pipe.cfg)
    pairs = [(n, k) for n in range(len(images)) for k in range(num_captions)]
    texts: list[str] = []
    for start in range(0, len(pairs), int(sc.batch_size)):
        chunk = pairs[start:start + int(sc.batch_size)]
        gens = [caption_generator(int(sc.seed), int(indices[n]), k) for n, k in chunk]
        cond = pipe.conditioner.cond(images[[n for n, _ in chunk]].to(pipe.device), pipe.device)
        if hasattr(model, "generate"):  # the autoregressive baseline
            ids = model.generate(cond["prefix"], tokenizer.cls_token_id, tokenizer.sep_token_id,
                                 tokenizer.pad_token_id, gens, temperature=objective.temperature)
        else:
            noise = torch.stack([torch.randn(model.latent_shape, generator=g) for g in gens]).to(pipe.device)
            x0 = sample(model, objective, noise, cond, None, solver=sc.solver, steps=int(sc.steps), generator=gens,
                        progress=progress, solver_options=dict(sc.solver_options),
                        step_hooks=objective.sample_hooks(model))
            ids = objective.decode(model, x0)
        texts.extend(ids_to_text(tokenizer, ids.cpu()))
    return [texts[i * num_captions:(i + 1) * num_captions] for i in range(len(images))]


def held_out(cfg, num: int, at_most: bool = False):
    """The first `num` items of the run's data set on its held-out split (data.split=test): pictures, reference
    captions, labels (or None) and a class-word reader (or None)."""
    from ..config import section_obj
    from ..registry import DATASETS

    data = cfg.data.copy()
    data.split = "test"
    dataset = DATASETS.build(cfg.data.name, section_obj(data))
    if not hasattr(dataset, "reference_items"):
        raise ConfigError(f"data set '{cfg.data.name}' has no reference captions: pass --images PATHS to caption pictures")
    if at_most:
        num = min(num, len(dataset.references))
    if num > len(dataset.references):
        raise ConfigError(f"the held-out split has {len(dataset.references)} images, fewer than --num {num}: "
                          f"use --num {len(dataset.references)}")
    return dataset.reference_items(num)


def contact_sheet(images: torch.Tensor, groups: Sequence[Sequence[str]], path: Path, thumb: int = 64) -> Path:
    """One row per picture: the picture (nearest-upscaled to `thumb` pixels) and its captions beside it."""
    from PIL import Image, ImageDraw, ImageFont

    from ..atomic import atomic_path

    font = ImageFont.load_default()
    line = 12
    width = thumb + 12 + 6 * max((len(c) for g in groups for c in g), default=10) + 12
    heights = [max(thumb, line * len(g) + 8) + 6 for g in groups]
    sheet = Image.new("RGB", (width, sum(heights) + 6), "white")
    draw = ImageDraw.Draw(sheet)
    y = 6
    for image, group, h in zip(images, groups, heights):
        arr = ((image.clamp(-1, 1) + 1) * 127.5).round().byte()
        arr = arr.expand(3, -1, -1) if arr.shape[0] == 1 else arr
        pic = Image.fromarray(arr.permute(1, 2, 0).numpy(), "RGB").resize((thumb, thumb), Image.NEAREST)
        sheet.paste(pic, (6, y))
        for j, caption in enumerate(group):
            draw.text((thumb + 12, y + 4 + j * line), caption, fill="black", font=font)
        y += h
    with atomic_path(path) as tmp:
        sheet.save(tmp, format="PNG")
    return path


def caption_to_dir(pipe, out_dir: Path, image_paths: Optional[Sequence[str]] = None, num_captions: int = 1,
                   resize: bool = False, progress: bool = True) -> dict:
    """Caption pictures (or the held-out split) into out_dir: captions.jsonl, contact_sheet.png, report.json."""
    from ..atomic import write_text

    sc = pipe.cfg.sample
    if image_paths:
        images = torch.stack([pipe.conditioner.load_image(p, resize=resize) for p in image_paths])
        names, references, labels, class_of = [str(p) for p in image_paths], None, None, None
    else:
        images, references, labels, class_of = held_out(pipe.cfg, int(sc.num))
        names = [f"held-out:{i}" for i in range(len(images))]
    indices = list(range(len(images)))
    start = time.perf_counter()
    groups = caption_images(pipe, images, indices, num_captions, progress=False)
    seconds = time.perf_counter() - start
    lines = [json.dumps({"image": name, "index": i, "seed": [int(sc.seed), i], "captions": g,
                         **({"references": references[i]} if references is not None else {}),
                         **({"label": labels[i]} if labels is not None else {})})
             for i, (name, g) in enumerate(zip(names, groups))]
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text(out_dir / "captions.jsonl", "\n".join(lines) + "\n")
    contact_sheet(images[:100], groups[:100], out_dir / "contact_sheet.png")
    report = {
        "source": pipe.source, "images": len(images), "num_captions": num_captions, "generated_now": len(images) * num_captions,
        "seconds": round(seconds, 3), "seconds_per_caption": round(seconds / (len(images) * num_captions), 5),
        "device": str(pipe.device), "parameters": sum(p.numel() for p in pipe.model.parameters()),
        "settings": {"seed": int(sc.seed), "solver": str(sc.solver), "steps": int(sc.steps),
                     "batch_size": int(sc.batch_size), "input": "images" if image_paths else "held-out split"},
        "captioning": caption_report(groups, references, labels, class_of),
    }
    save_json(out_dir / "report.json", report)
    print(f"[ditk] {len(images) * num_captions} captions for {len(images)} images in {seconds:.1f}s", file=sys.stderr)
    return report


def write_training_captions(pipe, path: Path, num: int = 16) -> None:
    """What `train` writes at its sample steps for a captioning run: a contact sheet of held-out digits."""
    was_training = pipe.model.training
    pipe.model.eval()
    images, references, _, _ = held_out(pipe.cfg, min(num, int(pipe.cfg.sample.num)), at_most=True)
    groups = caption_images(pipe, images, list(range(len(images))), 1)
    pipe.model.train(was_training)
    contact_sheet(images, groups, path)


def image_paths(images: Sequence[str], overrides: Sequence[str]) -> tuple[list[str], list[str]]:
    """`--images a.png b.png dir/`: click gives the first path to --images and the others to the positional
    KEY=VALUE arguments; take back the positional ones without '=' as paths. Folders give their images, sorted."""
    paths = list(images) + [o for o in overrides if "=" not in o]
    rest = [o for o in overrides if "=" in o]
    out = [str(p) for p in list_input_files(paths)] if paths else []
    return out, rest


def caption_command(pipe, source: str, out: Optional[str], images: Sequence[str], num_captions: Optional[int],
                    resize: bool, progress: bool) -> Path:
    """What `ditk sample` does for a captioning run (or when --images / --num-captions is given)."""
    from ..generate import default_out_dir, modality

    if modality(pipe.cfg) != "caption":
        raise ConfigError(f"--images/--num-captions/--resize are for captioning runs; {source} generates "
                          f"{modality(pipe.cfg)}s: drop them")
    k = 1 if num_captions is None else int(num_captions)
    if k < 1:
        raise ConfigError(f"--num-captions must be at least 1, got {k}: ask for one or more captions per image")
    if resize and not images:
        raise ConfigError("--resize applies to --images: give the pictures to caption, or drop --resize")
    tag = f"-captions{k}" + ("-images" if images else "")
    out_dir = Path(out) if out else Path(str(default_out_dir(pipe, source)) + tag)
    caption_to_dir(pipe, out_dir, list(images) or None, k, resize=resize, progress=progress)
    return out_dir
