"""What `ditk invert` and `ditk edit` do with a pipeline: read inputs, invert / edit, write the output folder."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch

from ..atomic import atomic_dir, write_text
from ..io import IMAGE_SUFFIXES, list_input_files
from ..errors import ConfigError
from .audio import AUDIO_SUFFIXES, Clips, is_audio, log_spectral_distance
from .artefact import (check_artefact, load_artefact, load_images, pipeline_identity, psnr,
                       save_artefact, ssim)
from .features import FeatureCapture, FeatureStore
from .inversion import Inverted, check_method, invert, reconstruct
from .preserve import STROKE_THRESHOLD, changed_strokes, class_prototypes, preservation

FEATURE_TENSORS = ("k", "v", "out")


def check_out_dir(out_dir: Path, kind: str) -> None:
    """The output folder is replaced as a whole (atomically): refuse one that is not an earlier output of `kind`."""
    if out_dir.exists() and (not out_dir.is_dir() or (any(out_dir.iterdir()) and not (out_dir / "report.json").is_file())):
        raise ConfigError(f"{out_dir} exists and is not a ditk {kind} output folder: pass another --out")


def log(msg: str) -> None:
    print(f"[ditk] {msg}", file=sys.stderr)


def image_geometry(pipe) -> tuple[int, int]:
    """(channels, size) of the images the pipeline's model generates (pixels, before the autoencoder)."""
    from ..build import latent_shape

    c, h, w = latent_shape(pipe.model)
    if h != w:
        raise ConfigError("invert/edit take square images; this model's inputs are not square")
    down = getattr(pipe.autoencoder, "downsample", 1)
    if down == 1:
        return c, h
    channels = int(getattr(getattr(pipe.autoencoder, "vae", None), "config", {}).get("in_channels", 3))
    return channels, h * down


def conditions(pipe, n: int, labels: Optional[str], prompt: Optional[str], what: str) -> tuple[dict, str]:
    """Model kwargs for n images from --class-labels / --prompt (None: the null condition), and a description."""
    conditioner = pipe.conditioner
    dev = pipe.device
    if getattr(conditioner, "unconditional", False):
        if labels or prompt:
            raise ConfigError(f"this model is unconditional (model.num_classes=0): drop the {what} labels/prompt")
        return {}, "unconditional"
    if prompt is not None:
        if not hasattr(conditioner, "encode_prompts"):
            raise ConfigError(f"--{'source-' if what == 'source' else ''}prompt needs a text-conditioned model; this one "
                              "takes class labels: use --class-labels")
        return conditioner.encode_prompts([prompt] * n, dev), f"prompt: {prompt!r}"
    if labels is None:
        return conditioner.uncond(n, dev), "null condition (unconditional branch)"
    chosen = conditioner.parse_labels(labels)
    full = torch.tensor([chosen[i % len(chosen)] for i in range(n)])
    return conditioner.cond(full.to(dev)), f"class labels {full.tolist()}"


def _encode(pipe, images: torch.Tensor, seed: int) -> torch.Tensor:
    return pipe.autoencoder.encode(images.to(pipe.device), generator=torch.Generator(pipe.device).manual_seed(seed)).float()


def _decode(pipe, z: torch.Tensor) -> torch.Tensor:
    return pipe.autoencoder.decode(z).float().cpu()


def run_invert(pipe, inputs: Sequence[str], method: str, steps: int, options: dict, labels: Optional[str],
               prompt: Optional[str], out_dir: Path, save_trajectory: bool, save_features: bool, do_reconstruct: bool,
               resize: bool, batch_size: int, seed: int, progress: bool) -> dict:
    check_method(method, pipe.objective, options)
    check_out_dir(out_dir, "invert")
    clips = Clips(pipe) if is_audio(pipe) else None
    if clips is not None:
        paths = list_input_files(inputs, AUDIO_SUFFIXES, noun="audio clip")
        images, _ = clips.load(paths, resize)  # normalised log-mel: the run's front end; all errors before any work
    else:
        paths = list_input_files(inputs)
        channels, size = image_geometry(pipe)
        images = load_images(paths, channels, size, resize)  # all errors before any work
    cond_all, cond_text = conditions(pipe, len(paths), labels, prompt, "source")
    identity = pipeline_identity(pipe)
    if clips is not None:
        identity["front_end"] = clips.front_end()
    latent = getattr(pipe.autoencoder, "downsample", 1) != 1
    depth = len(pipe.model.blocks)
    points = [f"blocks.{b}.attn.{t}_hook" for b in range(depth) for t in FEATURE_TENSORS] if save_features else []
    rows, start = [], time.perf_counter()
    with atomic_dir(out_dir) as tmp:
        for b in range(0, len(paths), batch_size):
            sl = slice(b, b + batch_size)
            x0 = _encode(pipe, images[sl], seed)
            cond = {k: v[sl] for k, v in cond_all.items()}
            capture = FeatureCapture(pipe.model, points)
            with capture.attached():
                inv = invert(pipe.model, pipe.objective, x0, cond, method, steps, options, step_hooks=[capture],
                             trajectory=save_trajectory, seed=seed, first_index=b, progress=progress)
            recon = None
            if do_reconstruct:
                recon, rec_nfe = reconstruct(pipe.model, pipe.objective, inv, cond, method, steps, options)
            for j, path in enumerate(paths[sl]):
                meta = {**identity, "source": pipe.source, "method": method, "options": options, "steps": steps,
                        "schedule": inv.grid, "conditioning": cond_text, "guidance": 1.0, "image": str(path),
                        "nfe": inv.nfe, "latent": latent}
                tensors = {"noise": inv.noise[j], "image": x0[j]}
                if inv.pair is not None:
                    tensors["pair"] = inv.pair[j]
                if inv.trajectory is not None:
                    tensors["trajectory"] = inv.trajectory[:, j]
                tensors.update(capture.store.to_tensors(j))
                for k, v in cond.items():
                    tensors[f"cond|{k}"] = v[j:j + 1]
                save_artefact(tmp / f"{path.stem}.safetensors", tensors, meta)
                row = {"image": str(path), "artefact": f"{path.stem}.safetensors", "nfe": inv.nfe,
                       "feature_mb": round(capture.store.nbytes / 2**20 / len(x0), 4)}
                rows.append(row)
            if recon is not None and clips is not None:
                _clip_metrics(pipe, clips, recon, x0, images[sl], rows[b:], [tmp / "reconstructions" / f"{p.stem}.wav"
                                                                        for p in paths[sl]])
                for r in rows[b:]:
                    r["reconstruction_nfe"] = rec_nfe
            elif recon is not None:
                rec_px, src_px = _decode(pipe, recon), images[sl]
                bound_px = _decode(pipe, x0) if latent else None
                p, s = psnr(rec_px.clamp(-1, 1), src_px), ssim(rec_px.clamp(-1, 1), src_px)
                mse = ((recon - x0) ** 2).flatten(1).mean(1).cpu().tolist()
                for j in range(len(x0)):
                    r = rows[b + j]
                    r.update({"reconstruction_nfe": rec_nfe, "latent_mse": mse[j], "psnr_db": p[j], "ssim": s[j]})
                    if bound_px is not None:  # the VAE round trip: what a perfect inversion could reach
                        r["vae_bound_psnr_db"] = psnr(bound_px[j:j + 1].clamp(-1, 1), src_px[j:j + 1])[0]
                    _save_png(rec_px[j], tmp / "reconstructions" / f"{paths[b + j].stem}.png")
        report = {"source": pipe.source, "method": method, "steps": steps, "options": options,
                  "guidance": "none (cfg scale 1): inversion is not defined under guidance", "conditioning": cond_text,
                  "seconds": round(time.perf_counter() - start, 3), "images": rows}
        if do_reconstruct:
            report["mean_psnr_db"] = float(np.mean([r["psnr_db"] for r in rows]))
            report["mean_latent_mse"] = float(np.mean([r["latent_mse"] for r in rows]))
            if clips is not None:
                report["mean_lsd_db"] = float(np.mean([r["lsd_db"] for r in rows]))
                report["mean_wav_lsd_db"] = float(np.mean([r["wav_lsd_db"] for r in rows]))
        if clips is not None:
            report["front_end"] = clips.front_end()
            report["vocoder"] = getattr(clips.io.vocoder, "name", type(clips.io.vocoder).__name__)
        write_text(tmp / "report.json", json.dumps(report, indent=2) + "\n")
        _lineage(tmp, pipe, inputs)
    return report


def _clip_metrics(pipe, clips, recon, x0, src_spec, rows, wav_paths) -> None:
    """Reconstruction error of audio clips, per row: latent MSE; the spectrogram's log-spectral distance (LSD, dB)
    and PSNR (normalised log-mel, range 2); with a VAE, the LSD of its own round trip (the bound); the regenerated
    WAV (run's vocoder) written and its re-analysed LSD, next to the vocoder's own bound (the source spectrogram
    vocoded and re-analysed)."""
    from ..audio.mel import save_spectrogram_png

    rec_spec = _decode(pipe, recon)
    mse = ((recon - x0) ** 2).flatten(1).mean(1).cpu().tolist()
    lsd, p = log_spectral_distance(rec_spec, src_spec), psnr(rec_spec.clamp(-1, 1), src_spec.clamp(-1, 1))
    bound = log_spectral_distance(_decode(pipe, x0), src_spec) if getattr(pipe.autoencoder, "downsample", 1) != 1 else None
    for j, path in enumerate(wav_paths):
        wave = clips.write(rec_spec[j], path)
        save_spectrogram_png(rec_spec[j, 0], path.with_suffix(".png"))
        wav_lsd = log_spectral_distance(clips.reanalysed(wave)[None], src_spec[j:j + 1])[0]
        vocoder_bound = log_spectral_distance(clips.reanalysed(clips.waveform(src_spec[j]))[None], src_spec[j:j + 1])[0]
        rows[j].update({"reconstruction": f"reconstructions/{path.name}", "latent_mse": mse[j], "lsd_db": lsd[j],
                        "psnr_db": p[j], "wav_lsd_db": wav_lsd, "vocoder_bound_lsd_db": vocoder_bound,
                        "samples": int(wave.numel())})
        if bound is not None:
            rows[j]["vae_bound_lsd_db"] = bound[j]


def _save_png(image: torch.Tensor, path: Path) -> None:
    from ..io import _pil, to_uint8

    path.parent.mkdir(parents=True, exist_ok=True)
    _pil(to_uint8(image[None])[0]).save(path)


def _lineage(folder: Path, pipe, inputs) -> None:
    from .. import __version__

    info = {"command": sys.argv, "ditk_version": __version__, "parent": str(pipe.run_dir or pipe.source),
            "inputs": [str(i) for i in inputs]}
    write_text(folder / "lineage.json", json.dumps(info, indent=2) + "\n")


def read_inputs(pipe, inputs: Sequence[str], resize: bool, seed: int,
                clips: Optional[Clips] = None) -> tuple[list[Path], torch.Tensor, list]:
    """Images (audio clips with `clips`) or inversion artefacts -> (paths, x0 latents (N, C, H, W), per-input
    artefact (tensors, meta) or None)."""
    suffixes = AUDIO_SUFFIXES if clips is not None else IMAGE_SUFFIXES
    paths = list_input_files(inputs, suffixes=(*suffixes, ".safetensors"),
                             noun="audio clip (or artefact)" if clips is not None else "image (or artefact)")
    identity = pipeline_identity(pipe)
    if clips is not None:
        identity["front_end"] = clips.front_end()
    else:
        channels, size = image_geometry(pipe)
    xs, arts = [], []
    for p in paths:
        if p.suffix == ".safetensors":
            tensors, meta = load_artefact(p)
            check_artefact(p, meta, identity)
            xs.append(tensors["image"].to(pipe.device)[None])
            arts.append((tensors, meta))
        else:
            x = clips.load([p], resize)[0] if clips is not None else load_images([p], channels, size, resize)
            xs.append(_encode(pipe, x, seed))
            arts.append(None)
    return paths, torch.cat(xs), arts


def stored_condition(arts: list, device) -> Optional[dict]:
    """The source condition the artefacts were inverted under (their `cond|<key>` tensors), if every input has one."""
    if not arts or any(a is None for a in arts):
        return None
    keys = [{k.split("|", 1)[1] for k in t if k.startswith("cond|")} for t, _ in arts]
    if any(k != keys[0] for k in keys):
        return None
    return {k: torch.cat([t[f"cond|{k}"] for t, _ in arts]).to(device) for k in keys[0]}


def reuse_inversion(arts: list, plan_, steps: int, points: list[str], src_cond: dict,
                    device) -> tuple[Optional[Inverted], Optional[FeatureStore], str]:
    """The artefacts' inversion when every input is an artefact of the plan's method, steps and options, inverted
    under this source condition and holding the features the plan injects; otherwise (None, None, why) and the edit
    inverts the stored images again."""
    if not arts or any(a is None for a in arts):
        return None, None, ""
    for tensors, meta in arts:
        if (meta.get("method"), int(meta.get("steps", -1)), meta.get("options", {})) != (
                plan_.inversion, steps, plan_.inversion_options):
            return None, None, f"the artefacts hold a {meta.get('steps')}-step '{meta.get('method')}' inversion"
        have = {k.split("|")[2] for k in tensors if k.startswith("feat|")}
        if not set(points) <= have:
            return None, None, "the artefacts lack the features this method injects (ditk invert --save-features)"
    stored = stored_condition(arts, device)
    if stored is None or set(stored) != set(src_cond) or any(not torch.equal(stored[k], src_cond[k]) for k in stored):
        return None, None, "the artefacts were inverted under another source condition"
    noise = torch.stack([t["noise"] for t, _ in arts]).to(device)
    pair = torch.stack([t["pair"] for t, _ in arts]).to(device) if "pair" in arts[0][0] else None
    stores = []
    for t, _ in arts:
        store = FeatureStore.from_tensors(t)
        store.data = {key: v for key, v in store.data.items() if key[1] in points}
        stores.append(store)
    return Inverted(noise=noise, pair=pair, nfe=0, grid={}), FeatureStore.concat(stores), ""


def digits_classifier():
    """The shipped digits CNN (ditk/metrics/weights/digits-cnn.safetensors, sha256-checked): (N, 1, 8, 8) images in
    [-1, 1] -> (logits (N, 10), features (N, 64))."""
    from safetensors.torch import load_file

    from ..metrics import offline
    from ..metrics.extractors import DIGITS_SHA256, DIGITS_WEIGHTS, DigitsNet

    offline.verify(DIGITS_WEIGHTS, DIGITS_SHA256, "digits extractor")
    net = DigitsNet()
    net.load_state_dict(load_file(DIGITS_WEIGHTS))
    net.eval()

    @torch.no_grad()
    def classify(images: torch.Tensor):
        x = images.float().mean(dim=1, keepdim=True)
        if x.shape[-1] != 8:
            x = torch.nn.functional.adaptive_avg_pool2d(x, 8)
        x = (x.clamp(-1, 1) + 1) / 2  # the classifier's convention: [0, 1], ink bright
        return net(x), net.features(x)

    return classify


def edit_scores(source: torch.Tensor, edited: torch.Tensor, targets: Optional[list], classify=None,
                changed: Optional[torch.Tensor] = None, stroke_threshold: float = STROKE_THRESHOLD) -> list[dict]:
    """Per image: PSNR/SSIM to the source; PSNR/SSIM outside the changed strokes (`changed` (N, 1, H, W), see
    ditk.edit.preserve; None: the pixels the edit moved by more than `stroke_threshold`); the fraction of pixels
    the edit moved; and with a classifier the predicted class, the target's probability and the feature distance."""
    moved = changed_strokes(source, edited, stroke_threshold)
    mask = moved if changed is None else changed
    out = [{"psnr_db": p, "ssim": s, **kept, "changed_fraction": float(c.mean())}
           for p, s, kept, c in zip(psnr(edited, source), ssim(edited, source), preservation(source, edited, mask), moved)]
    if classify is not None:
        logits, feats = classify(edited)
        _, feats_src = classify(source)
        prob = logits.softmax(-1)
        for i, row in enumerate(out):
            row["predicted_class"] = int(prob[i].argmax())
            row["feature_distance"] = float((feats[i] - feats_src[i]).norm())
            if targets is not None:
                row["target_class"] = int(targets[i])
                row["target_probability"] = float(prob[i, targets[i]])
                row["success"] = row["predicted_class"] == row["target_class"]
    return out


def stroke_mask(pipe, source_px: torch.Tensor, targets: Optional[list], region: Optional[torch.Tensor]):
    """(changed mask (N, 1, H, W) or None, its definition): the target-class prototype difference where the data
    set has prototypes and the targets are classes, else the --mask region, else None (the edit's own changes)."""
    protos = class_prototypes(pipe.cfg.data.name)
    if protos is not None and targets is not None and protos.shape[1:] == source_px.shape[1:]:
        return (changed_strokes(source_px, protos[torch.as_tensor(targets)]),
                f"|source - mean training image of the target class| > {STROKE_THRESHOLD}")
    if region is not None:
        return (region > 0.5).float(), "the --mask region"
    return None, f"pixels the edit moved by more than {STROKE_THRESHOLD}"


def run_edit(pipe, inputs: Sequence[str], method: str, steps: int, knobs: dict, inversion: Optional[str],
             rules, target_labels: Optional[str], target_prompt: Optional[str], source_labels: Optional[str],
             source_prompt: Optional[str], cfg_scale: float, mask_path: Optional[str], out_dir: Path, resize: bool,
             seed: int) -> dict:
    from ..io import save_grid, save_npz, save_pngs, to_uint8
    from .editors import edit, plan
    from .spec import capture_points, token_mask_from_image

    if target_labels is None and target_prompt is None:
        raise ConfigError("say what to edit towards: --class-labels for class-conditional models, --prompt for text models")
    check_out_dir(out_dir, "edit")
    depth = len(pipe.model.blocks)
    p = plan(method, pipe.objective, depth, steps, knobs, inversion, rules)
    clips = Clips(pipe) if is_audio(pipe) else None
    if clips is not None:
        check_audio_plan(pipe, p, method, mask_path)
    paths, x0, arts = read_inputs(pipe, inputs, resize, seed, clips)
    n = len(paths)
    src_cond, src_text = conditions(pipe, n, source_labels, source_prompt, "source")
    stored = stored_condition(arts, pipe.device) if source_labels is None and source_prompt is None else None
    if stored is not None:  # artefacts remember the condition they were inverted under: default to it
        src_cond, src_text = stored, "the artefacts' source condition"
    tgt_cond, tgt_text = conditions(pipe, n, target_labels, target_prompt, "target")
    null_cond = pipe.conditioner.uncond(n, pipe.device)
    if cfg_scale != 1.0 and getattr(pipe.conditioner, "unconditional", False):
        raise ConfigError("guidance needs a conditional model: use --cfg-scale 1")
    image_mask = region = None
    if mask_path is not None:
        concat = [r for r in p.rules if r.op == "concat"]
        if not concat:
            raise ConfigError(f"--mask guides concat rules (tic, or a custom spec with op: concat); --method {method} "
                              "has none: drop --mask")
        for r in concat:  # a given mask replaces TIC's feature-difference mask
            r.mask = "image"
        channels, size = image_geometry(pipe)
        m = (load_images([Path(mask_path)], 1, size, resize=True) + 1) / 2  # white = the region to edit
        grid = pipe.model.x_embedder.grid_size
        image_mask = token_mask_from_image(m.expand(n, -1, -1, -1), grid)
        region = m.expand(n, -1, -1, -1)
    inverted, store, why = reuse_inversion(arts, p, steps, capture_points(p.rules), src_cond, pipe.device)
    if inverted is not None:
        log(f"reusing the inversion stored in the {n} artefact(s)")
    elif why:
        log(f"inverting the artefacts' images again: {why}")
    res = edit(pipe.model, pipe.objective, x0, src_cond, tgt_cond, null_cond, p, steps, cfg_scale=cfg_scale,
               image_mask=image_mask, inverted=inverted, store=store, seed=seed)
    if clips is not None:
        return _write_audio_edit(pipe, clips, res, x0, paths, inputs, out_dir, {
            "source": pipe.source, "method": method, "inversion": p.inversion, "steps": steps, "knobs": knobs,
            "rules": [r.__dict__ for r in p.rules], "cfg_scale": cfg_scale, "source_condition": src_text,
            "target_condition": tgt_text, "nfe_per_image": res["nfe"], "inversion_nfe": res["inversion_nfe"],
            "seconds": round(res["seconds"], 3), "feature_cache_mb": res["feature_cache_mb"]})
    edited = _decode(pipe, res["edited"]).clamp(-1, 1)
    source_px = _decode(pipe, x0).clamp(-1, 1)
    classify = digits_classifier() if pipe.cfg.data.name == "digits" else None
    targets = tgt_cond["y"].tolist() if "y" in tgt_cond and target_prompt is None else None
    changed, changed_def = stroke_mask(pipe, source_px, targets, region)
    scores = edit_scores(source_px, edited, targets, classify, changed)
    with atomic_dir(out_dir) as tmp:
        save_pngs(edited, tmp / "images")
        if res["source_branch"] is not None:
            save_pngs(_decode(pipe, res["source_branch"]).clamp(-1, 1), tmp / "source_branch")
        save_npz(to_uint8(edited), tmp / "samples.npz")
        save_grid(torch.cat([source_px, edited]), tmp / "grid.png", nrow=n, scale=max(1, 64 // source_px.shape[-1]))
        report = {
            "source": pipe.source, "method": method, "inversion": p.inversion, "steps": steps, "knobs": knobs,
            "rules": [r.__dict__ for r in p.rules], "cfg_scale": cfg_scale, "source_condition": src_text,
            "target_condition": tgt_text, "nfe_per_image": res["nfe"], "inversion_nfe": res["inversion_nfe"],
            "seconds": round(res["seconds"], 3), "feature_cache_mb": res["feature_cache_mb"],
            "mask_keep_fraction": res["mask_keep_fraction"],
            "images": [{"input": str(pth), **s} for pth, s in zip(paths, scores)],
        }
        if targets is not None and classify is not None:
            report["edit_success"] = float(np.mean([s["success"] for s in scores]))
        report["changed_strokes"] = changed_def
        report["mean_psnr_outside_changed_db"] = float(np.mean([min(s["psnr_outside_changed_db"], 99.0) for s in scores]))
        report["mean_ssim_outside_changed"] = float(np.nanmean([s["ssim_outside_changed"] for s in scores]))
        write_text(tmp / "report.json", json.dumps(report, indent=2, default=list) + "\n")
        _lineage(tmp, pipe, inputs)
    return report


def check_audio_plan(pipe, p, method: str, mask_path: Optional[str]) -> None:
    """What an audio model cannot take: an image mask, and concat rules over a text-masked joint sequence (the concat
    recomputes attention without the model's text-padding mask)."""
    if mask_path is not None:
        raise ConfigError("--mask is an image of the region to edit: audio models take none; drop --mask")
    if any(r.op == "concat" for r in p.rules) and getattr(pipe.model, "mask_text", False):
        raise ConfigError(f"--method {method} concatenates K/V, which would drop this model's text-padding mask "
                          "(model.mask_text): use rf-edit, fireflow, rf-inversion, masactrl or naive")


def _write_audio_edit(pipe, clips: Clips, res: dict, x0: torch.Tensor, paths: list, inputs, out_dir: Path,
                      report: dict) -> dict:
    """Edited clips -> audio/NNNNNN.wav (+ source_branch/), spectrograms/NNNNNN.png, spectrograms.npy, grid.png
    (sources above edits) and report.json: per clip the log-spectral distance and spectrogram PSNR to the source, and
    on the synthesised music data the pitch direction heard in the source and in the edited WAV."""
    from PIL import Image

    from ..audio import analysis
    from ..audio.generate import stack_rgb
    from ..audio.mel import denormalize, save_spectrogram_png

    edited = _decode(pipe, res["edited"])
    source = _decode(pipe, x0)
    lsd, p = log_spectral_distance(edited, source), psnr(edited.clamp(-1, 1), source.clamp(-1, 1))
    music = pipe.cfg.data.name == "music"
    rows = []
    with atomic_dir(out_dir) as tmp:
        for i, (path, spec) in enumerate(zip(paths, edited)):
            wave = clips.write(spec, tmp / "audio" / f"{i:06d}.wav")
            save_spectrogram_png(spec[0], tmp / "spectrograms" / f"{i:06d}.png")
            row = {"input": str(path), "wav": f"audio/{i:06d}.wav", "samples": int(wave.numel()),
                   "lsd_to_source_db": lsd[i], "spectrogram_psnr_db": p[i]}
            if music:  # what the synthesised data's prompts describe (ditk.audio.analysis on the log-mel)
                row["source_direction"] = analysis.direction(denormalize(source[i, 0]), clips.front)
                row["edited_direction"] = analysis.direction(denormalize(spec[0]), clips.front)
            rows.append(row)
        if res["source_branch"] is not None:
            for i, spec in enumerate(_decode(pipe, res["source_branch"])):
                clips.write(spec, tmp / "source_branch" / f"{i:06d}.wav")
        with open(tmp / "spectrograms.npy", "wb") as f:
            np.save(f, edited[:, 0].numpy().astype(np.float32))
        Image.fromarray(stack_rgb(list(source[:, 0]) + list(edited[:, 0]), scale=pipe.cfg.sample.grid_scale)).save(
            tmp / "grid.png")
        report.update({"clips": rows, "mean_lsd_to_source_db": float(np.mean(lsd)), "front_end": clips.front_end(),
                       "vocoder": getattr(clips.io.vocoder, "name", type(clips.io.vocoder).__name__)})
        write_text(tmp / "report.json", json.dumps(report, indent=2, default=list) + "\n")
        _lineage(tmp, pipe, inputs)
    return report
