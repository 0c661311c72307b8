"""Expert-usage report of a mixture-of-experts model while it samples (`ditk sample ... --moe-stats`).

Reproduces the specialisation analysis of DiT-MoE (Fei et al. 2024, Sec. 4.3; the official
`analysis/heatmap_{step,class,patch}.py`): for every MoE layer, how often each expert is among the top-k
choices of a token, split by denoising step, by class label and by spatial position. As in the official
scripts, only conditional tokens count: under classifier-free guidance the unconditional half of the batch
is left out; each of a token's k choices counts once.

Forward hooks do the recording (nothing in the model or the sampling loop changes): a pre-hook on the model
reads the model time t and the labels y of each call, a hook on every MoE router reads its top-k expert ids.
A model call in which a feature cache skipped some MoE layers is not counted (`incomplete_calls` in the JSON).

Files written into the output folder:
- `moe_stats.json`: counts[by][layer][row][expert] for by = timestep (one row per model call of the sampler,
  noisiest first, with its model time), class and position (row-major over the patch grid), plus the layers,
  the expert usage per layer and the image indices covered;
- `moe_routing.npz`: every routing decision: experts (R, layers, tokens, k) uint8/int16, one row per
  (image, model call), with image (R,), call (R,), time (R,) and label (R,);
- `moe_heatmap.png`: one heatmap per layer and analysis (rows: timestep / class / position; columns: experts),
  each min-max normalised like the paper's figures.
"""

from __future__ import annotations

import contextlib
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from .atomic import atomic_path
from .errors import ConfigError
from .runs import save_json

STATS_FILE = "moe_stats.json"
ROUTING_FILE = "moe_routing.npz"
HEATMAP_FILE = "moe_heatmap.png"
ANALYSES = ("timestep", "class", "position")


def moe_layers(model: torch.nn.Module) -> list:
    """(name, layer) of every SparseMoE layer of `model`, in depth order."""
    from .models.dit_moe import SparseMoE

    return [(name, m) for name, m in model.named_modules() if isinstance(m, SparseMoE)]


class ExpertUsageRecorder:
    """Records the top-k choices of every MoE layer at every model call while attached.

    guided: the model runs on [conditional; unconditional] batches (classifier-free guidance), whose second half
    is not recorded. image_indices: the global image index of each sampled image, in sampling order; without it
    images are numbered 0, 1, ... in that order.
    """

    def __init__(self, model: torch.nn.Module, guided: bool = False, image_indices: Optional[Sequence[int]] = None,
                 num_classes: Optional[int] = None,
                 class_names: Optional[Sequence[str]] = None):
        self.model = model
        self.layers = moe_layers(model)
        if not self.layers:
            raise ConfigError(f"--moe-stats needs a mixture-of-experts model (dit-moe); {type(model).__name__} has no MoE layer")
        self.num_experts = self.layers[0][1].num_experts
        self.top_k = self.layers[0][1].top_k
        self.guided = guided
        self.image_indices = list(image_indices) if image_indices is not None else None
        self.num_classes = int(num_classes if num_classes is not None else getattr(model, "num_classes", 0))
        self.class_names = list(class_names) if class_names else None
        self.calls: list[dict] = []  # one per model call; experts None where some MoE layer did not run
        self.incomplete = 0  # calls in which a cache (TeaCache, ...) skipped MoE layers: not counted
        self._current: Optional[dict] = None
        self._handles: list = []

    # ----------------------------------------------------------------------------- hooks

    def _before(self, module, args, kwargs):
        x = args[0]
        t = args[1] if len(args) > 1 else kwargs["t"]
        y = args[2] if len(args) > 2 else kwargs.get("y")
        n = x.shape[0] // 2 if self.guided else x.shape[0]  # conditional half first (ditk.sampling)
        labels = y[:n].detach().cpu() if y is not None else torch.full((n,), -1)
        self._current = {"n": n, "time": float(t.reshape(-1)[0]), "label": labels.long(), "experts": []}

    def _route(self, module, args, output):
        if self._current is None:
            return  # a router called outside a model forward (e.g. a unit test of the layer)
        experts = output[0]  # (M, k), M = batch * tokens
        batch = self._current["n"] * (2 if self.guided else 1)
        experts = experts.reshape(batch, -1, experts.shape[-1])[: self._current["n"]]
        self._current["experts"].append(experts.detach().cpu())

    def _after(self, module, args, output):
        call, self._current = self._current, None
        if call is None:
            return
        if len(call["experts"]) == len(self.layers):
            call["experts"] = torch.stack(call["experts"], dim=1)  # (n, layers, tokens, k)
        else:  # an incomplete call still takes its place, so the step numbering of the sampler stays right
            call["experts"] = None
            self.incomplete += 1
        self.calls.append(call)

    @contextlib.contextmanager
    def attached(self):
        """Record while inside the block; the hooks are removed on exit."""
        self._handles = [self.model.register_forward_pre_hook(self._before, with_kwargs=True),
                         self.model.register_forward_hook(self._after)]
        self._handles += [layer.gate.register_forward_hook(self._route) for _, layer in self.layers]
        try:
            yield self
        finally:
            for handle in self._handles:
                handle.remove()
            self._handles = []

    # ----------------------------------------------------------------------------- results

    def routing(self) -> dict:
        """Every recorded decision as arrays: experts (R, L, T, k), image, call, time, label (R,).

        Model calls are grouped into sampling runs: a run starts when the time goes up (samplers walk from
        noise to data) or the batch size changes; runs take consecutive images of image_indices."""
        rows = {"experts": [], "image": [], "call": [], "time": [], "label": []}
        run, call_in_run, first = -1, 0, 0
        prev = None
        for call in self.calls:
            if prev is None or call["time"] > prev["time"] or call["n"] != prev["n"]:
                run += 1
                call_in_run = 0
                first = first + prev["n"] if prev is not None else 0
            else:
                call_in_run += 1
            prev = call
            n = call["n"]
            if call["experts"] is None:
                continue
            order = [first + j for j in range(n)]
            if self.image_indices is not None and len(self.image_indices) >= first + n:
                images = [self.image_indices[i] for i in order]
            else:
                images = order
            rows["experts"].append(call["experts"])
            rows["image"] += images
            rows["call"] += [call_in_run] * n
            rows["time"] += [call["time"]] * n
            rows["label"].append(call["label"])
        if not rows["experts"]:
            raise ConfigError("--moe-stats recorded no routing: no image was sampled (or a cache skipped every MoE layer): pass a new --out")
        dtype = torch.uint8 if self.num_experts <= 256 else torch.int16
        return {
            "experts": torch.cat(rows["experts"]).to(dtype).numpy(),
            "image": np.asarray(rows["image"], dtype=np.int64),
            "call": np.asarray(rows["call"], dtype=np.int64),
            "time": np.asarray(rows["time"], dtype=np.float32),
            "label": torch.cat(rows["label"]).numpy().astype(np.int64),
        }

    def summary(self, routing: Optional[dict] = None) -> dict:
        """Counts of expert choices per layer by timestep (model call), class and position, and usage."""
        r = routing if routing is not None else self.routing()
        experts = r["experts"]  # (R, L, T, k)
        rows, layers, tokens, k = experts.shape
        e = self.num_experts
        steps = int(r["call"].max()) + 1
        valid = r["label"] >= 0
        classes = max(self.num_classes, int(r["label"].max()) + 1 if valid.any() else 0)
        by_step = np.zeros((layers, steps, e), dtype=np.int64)
        by_class = np.zeros((layers, classes, e), dtype=np.int64)
        by_position = np.zeros((layers, tokens, e), dtype=np.int64)
        for layer in range(layers):  # one layer at a time keeps the index arrays small
            chosen = experts[:, layer].astype(np.int64)  # (R, T, k); every one of the k choices counts once
            row_of = np.broadcast_to(np.arange(rows)[:, None, None], chosen.shape)
            token_of = np.broadcast_to(np.arange(tokens)[None, :, None], chosen.shape)
            by_position[layer] = np.bincount((token_of * e + chosen).ravel(), minlength=tokens * e).reshape(tokens, e)
            per_row = np.bincount((row_of * e + chosen).ravel(), minlength=rows * e).reshape(rows, e)
            np.add.at(by_step[layer], r["call"], per_row)
            np.add.at(by_class[layer], r["label"][valid], per_row[valid])
        # model time of each sampler call (float32); None for a call that a cache skipped entirely
        times = [round(float(r["time"][r["call"] == s][0]), 6) if (r["call"] == s).any() else None
                 for s in range(steps)]
        side = int(round(math.sqrt(tokens)))
        usage = by_position.sum(axis=1)  # (L, E)
        return {
            "layers": [name for name, _ in self.layers],
            "num_experts": e,
            "top_k": k,
            "tokens": tokens,
            "grid": [side, side] if side * side == tokens else [1, tokens],
            "images": sorted(set(int(i) for i in r["image"])),
            "guided": self.guided,
            "incomplete_calls": self.incomplete,
            "times": times,
            "class_names": self.class_names or [str(c) for c in range(classes)],
            "usage": (usage / usage.sum(axis=1, keepdims=True)).round(6).tolist(),
            "counts": {"timestep": by_step.tolist(), "class": by_class.tolist(), "position": by_position.tolist()},
            "files": {"routing": ROUTING_FILE, "heatmap": HEATMAP_FILE},
        }

    def write(self, out_dir: Path) -> Path:
        """Write moe_stats.json, moe_routing.npz and moe_heatmap.png into out_dir; returns the JSON path."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        routing = self.routing()
        stats = self.summary(routing)
        with atomic_path(out_dir / ROUTING_FILE) as tmp, open(tmp, "wb") as f:
            np.savez_compressed(f, **routing)
        image = render_heatmaps(stats)
        with atomic_path(out_dir / HEATMAP_FILE) as tmp:
            image.save(tmp, format="PNG")
        save_json(out_dir / STATS_FILE, stats)
        return out_dir / STATS_FILE


@contextlib.contextmanager
def expert_usage(pipe, out_dir: Path, enabled: bool = True):
    """`ditk sample --moe-stats`: record the routing of pipe.model while the block samples into out_dir,
    then write the report there. Does nothing when not enabled."""
    if not enabled:
        yield None
        return
    sc = pipe.cfg.sample
    images = Path(out_dir) / "images"
    # generate_to_dir samples the missing images in index order, sc.batch_size at a time.
    pending = [i for i in range(sc.num) if not (images / f"{i:06d}.png").is_file()]
    if not pending:
        raise ConfigError(f"--moe-stats: {out_dir} already holds all {sc.num} images, so nothing would be sampled: pass a new --out")
    recorder = ExpertUsageRecorder(pipe.model, guided=float(sc.cfg_scale) != 1.0, image_indices=pending,
                                   num_classes=pipe.model.num_classes,
                                   class_names=getattr(pipe.conditioner, "class_names", None))
    with recorder.attached():
        yield recorder
    path = recorder.write(out_dir)
    print(f"[ditk] expert usage of {len(recorder.layers)} MoE layers -> {path}, {HEATMAP_FILE}, {ROUTING_FILE}",
          file=sys.stderr)


#################################################################################
#                              Heatmap rendering                                #
#################################################################################

PANEL_HEIGHT = 120
LOW, HIGH = np.array([255, 255, 255]), np.array([8, 48, 107])  # white -> dark blue


def _normalise(a: np.ndarray) -> np.ndarray:
    a = a.astype(np.float64)
    span = a.max() - a.min()
    return (a - a.min()) / span if span > 0 else np.zeros_like(a)


def _panel(matrix: np.ndarray, width: int):
    """rows x experts counts -> an RGB PIL image width x PANEL_HEIGHT (min-max normalised, white to blue)."""
    from PIL import Image

    # Many rows (1000 classes) are averaged into the panel's pixels (box filter); few rows are repeated.
    resample = Image.Resampling.BOX if matrix.shape[0] > PANEL_HEIGHT else Image.Resampling.NEAREST
    image = Image.fromarray(_normalise(matrix).astype(np.float32), mode="F")
    values = np.asarray(image.resize((width, PANEL_HEIGHT), resample=resample))
    rgb = LOW + (HIGH - LOW) * values[..., None]
    return Image.fromarray(rgb.round().clip(0, 255).astype(np.uint8), mode="RGB")


def render_heatmaps(stats: dict):
    """One panel per (analysis, layer): rows = timestep (noisiest first) / class / position, columns = experts."""
    from PIL import Image, ImageDraw

    layers, e = len(stats["layers"]), stats["num_experts"]
    cell = max(4, 96 // e)
    width = cell * e
    left, top, gap = 110, 28, 8
    height = top + len(ANALYSES) * (PANEL_HEIGHT + gap + 12) + 14
    canvas = Image.new("RGB", (max(left + layers * (width + gap), 330), height), "white")
    draw = ImageDraw.Draw(canvas)
    titles = {"timestep": "timestep\n(noise -> data)", "class": "class", "position": "position\n(row-major)"}
    for i, analysis in enumerate(ANALYSES):
        y = top + i * (PANEL_HEIGHT + gap + 12)
        draw.multiline_text((4, y + PANEL_HEIGHT // 2 - 10), titles[analysis], fill="black")
        for j in range(layers):
            x = left + j * (width + gap)
            matrix = np.asarray(stats["counts"][analysis][j])
            canvas.paste(_panel(matrix, width), (x, y))
            if i == 0:
                draw.text((x, 4), f"MoE layer {j}", fill="black")
            draw.text((x, y + PANEL_HEIGHT + 1), f"experts 0-{e - 1}", fill="gray")
    draw.text((4, height - 13), f"top-{stats['top_k']} choices of conditional tokens; each panel min-max normalised",
              fill="gray")
    return canvas
