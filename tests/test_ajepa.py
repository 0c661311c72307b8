"""A-JEPA: the encoder against transformers' I-JEPA, the masking curriculum, the EMA target encoder, the loss
and the training-loop integration (`ditk train a-jepa-*`)."""

import json
import math

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from ditk.audio import ajepa as aj
from ditk.config import resolve, section_obj
from ditk.errors import ConfigError
from ditk.registry import MODELS, OBJECTIVES

TINY_MODEL = dict(input_size=32, frames=32, patch_size=4, hidden_size=32, depth=2, num_heads=2,
                  predictor_hidden_size=16, predictor_depth=1, predictor_num_heads=2)  # an 8 x 8 patch grid
TINY_OBJECTIVE = dict()
# `ditk train a-jepa-tiny` shrunk to seconds: 16 clips of 1 s at 32 mel bins, the model above.
TRAIN_TINY = ["model.input_size=32", "model.frames=32", "model.patch_size=4", "model.hidden_size=32", "model.depth=2",
              "model.num_heads=2", "model.predictor_hidden_size=16", "model.predictor_depth=1",
              "model.predictor_num_heads=2", "data.num_clips=16", "data.frames=32", "data.n_mels=32",
              "train.global_batch_size=8", "train.log_every=1", "train.ckpt_every=2", "optim.warmup_steps=0"]


def tiny_model(**kw):
    torch.manual_seed(0)
    cfg = MODELS.get("a-jepa").config(**{**TINY_MODEL, **kw})
    return MODELS.build("a-jepa", cfg)


def tiny_objective(**kw):
    return OBJECTIVES.build("a-jepa", OBJECTIVES.get("a-jepa").config(**{**TINY_OBJECTIVE, **kw}))


# ----------------------------------------------------------------------------------------------- encoder


def test_position_embedding_generalises_the_square_one():
    from ditk.models.layers import get_2d_sincos_pos_embed

    np.testing.assert_array_equal(aj.sincos_pos_embed(64, 8, 8), get_2d_sincos_pos_embed(64, 8))
    rect = aj.sincos_pos_embed(16, 2, 5)  # token r * 5 + c: first half encodes the column, second half the row
    col = aj.sincos_pos_embed(16, 1, 5)[:, :8]
    row = aj.sincos_pos_embed(16, 2, 1)[:, 8:]
    for r in range(2):
        for c in range(5):
            np.testing.assert_array_equal(rect[r * 5 + c], np.concatenate([col[c], row[r]]))


def test_encoder_equals_transformers_ijepa_model_with_the_same_weights():
    """Oracle: transformers' IJepaModel (the I-JEPA ViT) on a rectangular spectrogram, weights copied over."""
    from transformers import IJepaConfig, IJepaModel

    torch.manual_seed(0)
    enc = aj.ViTEncoder(input_size=16, frames=32, patch_size=8, in_channels=1, dim=32, depth=2, num_heads=2,
                        mlp_ratio=4.0).eval()
    for p in enc.parameters():  # I-JEPA's init zeroes biases and sets LayerNorms to 1/0: perturb all of them
        p.data.add_(0.05 * torch.randn_like(p))
    cfg = IJepaConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=128,
                      image_size=(16, 32), patch_size=8, num_channels=1, layer_norm_eps=1e-6, hidden_act="gelu",
                      qkv_bias=True)
    ref = IJepaModel(cfg, add_pooling_layer=False).eval()
    sd = {"embeddings.position_embeddings": enc.pos_embed,
          "embeddings.patch_embeddings.projection.weight": enc.patch_embed.proj.weight,
          "embeddings.patch_embeddings.projection.bias": enc.patch_embed.proj.bias,
          "layernorm.weight": enc.norm.weight, "layernorm.bias": enc.norm.bias}
    for i, b in enumerate(enc.blocks):
        q, k, v = b.attn.qkv.weight.chunk(3)
        qb, kb, vb = b.attn.qkv.bias.chunk(3)
        pre = f"layers.{i}."
        sd.update({pre + "attention.q_proj.weight": q, pre + "attention.q_proj.bias": qb,
                   pre + "attention.k_proj.weight": k, pre + "attention.k_proj.bias": kb,
                   pre + "attention.v_proj.weight": v, pre + "attention.v_proj.bias": vb,
                   pre + "attention.o_proj.weight": b.attn.proj.weight, pre + "attention.o_proj.bias": b.attn.proj.bias,
                   pre + "layernorm_before.weight": b.norm1.weight, pre + "layernorm_before.bias": b.norm1.bias,
                   pre + "layernorm_after.weight": b.norm2.weight, pre + "layernorm_after.bias": b.norm2.bias,
                   pre + "mlp.fc1.weight": b.mlp.fc1.weight, pre + "mlp.fc1.bias": b.mlp.fc1.bias,
                   pre + "mlp.fc2.weight": b.mlp.fc2.weight, pre + "mlp.fc2.bias": b.mlp.fc2.bias})
    missing, unexpected = ref.load_state_dict(sd, strict=False)
    assert not unexpected and not [k for k in missing if "mask_token" not in k]
    x = torch.randn(3, 1, 16, 32)
    with torch.no_grad():
        torch.testing.assert_close(enc(x), ref(x).last_hidden_state, rtol=1e-5, atol=1e-5)
        # the context path: the blocks see only the kept tokens (with their own positions)
        keep = torch.tensor([[0, 2, 5], [1, 3, 7], [4, 5, 6]])
        tokens = enc.patch_embed(x) + enc.pos_embed
        manual = aj.gather_tokens(tokens, keep)
        for b in enc.blocks:
            manual = b(manual)
        torch.testing.assert_close(enc(x, keep), enc.norm(manual))


def test_vit_b_encoder_has_the_paper_size():
    """A-JEPA's default encoder is ViT-B/16 (~86M): the same count as transformers' IJepaModel of that shape,
    less its learned position table (ditk's positions are fixed sin-cos, as I-JEPA's)."""
    from transformers import IJepaConfig, IJepaModel

    cfg = resolve("a-jepa-vit-b", allow_missing=("data",))
    with torch.device("meta"):
        model = MODELS.build("a-jepa", section_obj(cfg.model))
        ref = IJepaModel(IJepaConfig(hidden_size=768, num_hidden_layers=12, num_attention_heads=12,
                                     intermediate_size=3072, image_size=(128, 1024), patch_size=16, num_channels=1),
                         add_pooling_layer=False)
    report = model.parameter_report()
    ref_count = sum(p.numel() for p in ref.parameters()) - ref.embeddings.position_embeddings.numel()
    assert report["encoder"] == report["target encoder"] == ref_count == 85_253_376
    assert model.grid == (8, 64) and model.num_patches == 512  # 128 mel bins x 1024 frames, 16 x 16 patches
    d, p = 512, 16  # the paper's predictor: 16 blocks of width 512 (Tables 5-6), plus in/out projections
    assert report["predictor"] == p * (12 * d * d + 13 * d) + 2 * d + (768 * d + d) + (d * 768 + 768) + d


# ------------------------------------------------------------------------------------------------- masks


def test_curriculum_progress_is_the_papers_function():
    S, c0 = 1000, 0.01
    assert aj.curriculum_progress(0, S, c0) == pytest.approx(c0**2)
    assert aj.curriculum_progress(S, S, c0) == 1.0
    for s in (1, 10, 250, 640, 999):
        assert aj.curriculum_progress(s, S, c0) == pytest.approx(min(1, math.sqrt(s * (1 - c0**2) / S) + c0**2))
    values = [aj.curriculum_progress(s, S, c0) for s in range(0, S + 1, 50)]
    assert values == sorted(values)


def _bounding_box_filled(mask2d):
    rows, cols = np.nonzero(mask2d)
    return mask2d[rows.min():rows.max() + 1, cols.min():cols.max() + 1].all()


def test_random_block_phase_makes_i_jepa_blocks():
    """Early in the curriculum (f ~ 1e-4) every step uses 4 rectangular target blocks of scale 0.15-0.2 that
    span neither axis, shared in size by the batch; the context avoids them."""
    cfg, grid = aj.MaskConfig(), (8, 64)  # a 10 s clip: 128 mel x 1024 frames in 16 x 16 patches
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        masks, kind = aj.sample_masks(6, grid, cfg, step=0, total=1000, generator=g)
        assert kind == "random-block" and masks.shape == (6, 5, 512)
        m = masks.numpy().reshape(6, 5, 8, 64)
        sizes = {int(masks[i, k].sum()) for i in range(6) for k in range(1, 5)}
        assert len(sizes) == 1  # one block size per step
        for i in range(6):
            for k in range(1, 5):
                assert _bounding_box_filled(m[i, k])
                rows, cols = np.nonzero(m[i, k])
                assert len(set(rows)) < 8 and len(set(cols)) < 64
                assert 0.10 <= m[i, k].mean() <= 0.26  # scale 0.15-0.2 up to rounding to whole patches
            assert not (m[i, 0] & m[i, 1:].any(0)).any()  # context and targets are disjoint
        assert len({int(c) for c in masks[:, 0].sum(-1)}) == 1 and int(masks[0, 0].sum()) >= cfg.min_keep


def test_time_frequency_phase_makes_time_segments_and_frequency_bands():
    """At the end of the curriculum (f = 1) every step uses 3 time-frequency blocks: each spans every frequency
    row (a time segment of 5-7.5% of the clip) or the whole clip (a frequency band); both kinds occur."""
    cfg, grid = aj.MaskConfig(), (8, 64)
    g = torch.Generator().manual_seed(1)
    kinds = set()
    for _ in range(30):
        masks, kind = aj.sample_masks(4, grid, cfg, step=1000, total=1000, generator=g)
        assert kind == "time-frequency" and masks.shape == (4, 4, 512)
        m = masks.numpy().reshape(4, 4, 8, 64)
        for i in range(4):
            assert not (m[i, 0] & m[i, 1:].any(0)).any()
            for k in range(1, 4):
                rows, cols = np.nonzero(m[i, k])
                assert _bounding_box_filled(m[i, k])
                if len(set(rows)) == 8:  # a time segment: 0.05-0.075 x 64 = 3-5 columns
                    kinds.add("time")
                    assert 3 <= len(set(cols)) <= 5
                else:  # a frequency band: the whole clip, one row (0.05-0.075 x 8 rounds to 0, at least 1)
                    kinds.add("frequency")
                    assert len(set(cols)) == 64 and len(set(rows)) == 1
    assert kinds == {"time", "frequency"}


def test_curriculum_moves_from_blocks_to_time_frequency_at_the_papers_rate():
    cfg, grid, S = aj.MaskConfig(), (8, 8), 1000
    g = torch.Generator().manual_seed(2)
    for step in (250, 640):  # f = 0.50 and 0.80
        kinds = [aj.sample_masks(2, grid, cfg, step, S, g)[1] for _ in range(300)]
        share = kinds.count("time-frequency") / len(kinds)
        assert abs(share - aj.curriculum_progress(step, S)) < 0.09, (step, share)
    inverse = aj.MaskConfig(masking="inverse")
    assert aj.sample_masks(2, grid, inverse, 0, S, g)[1] == "time-frequency"
    assert aj.sample_masks(2, grid, inverse, S, S, g)[1] == "random-block"
    fixed = aj.MaskConfig(masking="random-block")
    assert {aj.sample_masks(2, grid, fixed, S, S, g)[1] for _ in range(20)} == {"random-block"}
    with pytest.raises(ConfigError, match="objective.masking"):
        aj.MaskConfig(masking="spiral").check()


def test_masks_are_a_pure_function_of_the_generator():
    cfg = aj.MaskConfig()
    a = aj.sample_masks(8, (8, 64), cfg, 300, 1000, torch.Generator().manual_seed(7))[0]
    b = aj.sample_masks(8, (8, 64), cfg, 300, 1000, torch.Generator().manual_seed(7))[0]
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------ target, loss, training


def test_target_encoder_never_receives_gradients():
    model, obj = tiny_model(), tiny_objective()
    assert not any(p.requires_grad for p in model.target_encoder.parameters())
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert trainable == {id(p) for m in (model.encoder, model.predictor) for p in m.parameters()}
    obj.begin_step(model, 0, 10)
    masks = obj.sample_time(4, torch.Generator().manual_seed(0))
    x = torch.randn(4, 1, 32, 32)
    # even with requires_grad switched on, the targets are computed under no_grad (stop-gradient)
    model.target_encoder.requires_grad_(True)
    obj.training_losses(model, x, masks)["loss"].mean().backward()
    assert all(p.grad is None for p in model.target_encoder.parameters())
    assert all(p.grad is not None for p in model.encoder.blocks.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())


def test_ema_target_follows_the_i_jepa_momentum_schedule():
    """Replay in float64: target_{i+1} = m_i target_i + (1 - m_i) encoder_{i+1}, m_i = 0.996 + 0.004 i / S."""
    model, obj = tiny_model(), tiny_objective()
    S = 5
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    expected = [p.detach().double().clone() for p in model.target_encoder.parameters()]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(4, 1, 32, 32)
    for i in range(S):
        obj.begin_step(model, i, S)
        loss = obj.training_losses(model, x, obj.sample_time(4, g))["loss"].mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        obj.end_step(model, i, S)
        m = 0.996 + 0.004 * i / S
        assert obj.momentum_at(i, S) == pytest.approx(m)
        expected = [m * t + (1 - m) * p.detach().double() for t, p in zip(expected, model.encoder.parameters())]
    for t, p in zip(expected, model.target_encoder.parameters()):
        torch.testing.assert_close(p.double(), t, rtol=0, atol=1e-6)
    assert obj.momentum_at(S, S) == 1.0
    assert not all(torch.equal(a, b) for a, b in zip(model.target_encoder.parameters(), model.encoder.parameters()))


def test_loss_is_the_average_l2_distance_and_predictions_follow_each_block():
    model, obj = tiny_model(), tiny_objective()
    obj.begin_step(model, 0, 10)
    masks = obj.sample_time(3, torch.Generator().manual_seed(3))
    x = torch.randn(3, 1, 32, 32)
    preds, targets = model(x, masks)
    assert len(preds) == masks.shape[1] - 1
    manual = torch.stack([((p - h) ** 2).mean(dim=(1, 2)) for p, h in zip(preds, targets)]).mean(0)
    torch.testing.assert_close(obj.training_losses(model, x, masks)["loss"], manual)
    # targets are the layer-normalised target-encoder tokens at the block's positions
    context, blocks = aj.split_masks(masks)
    with torch.no_grad():
        h = torch.nn.functional.layer_norm(model.target_encoder(x), (32,))
        z = model.encoder(x, context)
        for k, idx in enumerate(blocks):
            torch.testing.assert_close(targets[k], aj.gather_tokens(h, idx))
            torch.testing.assert_close(preds[k], model.predictor(z, context, idx))
            # the predictor is equivariant: shuffling the context tokens (with their indices) changes nothing
            perm = torch.randperm(context.shape[1])
            torch.testing.assert_close(model.predictor(z[:, perm], context[:, perm], idx), preds[k],
                                       rtol=1e-5, atol=1e-5)


def test_loss_decreases_over_a_few_steps_of_training():
    model, obj = tiny_model(), tiny_objective()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(8, 1, 32, 32, generator=g)
    losses = []
    S = 40
    for i in range(S):
        obj.begin_step(model, i, S)
        loss = obj.training_losses(model, x, obj.sample_time(8, g))["loss"].mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        obj.end_step(model, i, S)
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5]), losses


def test_ditk_train_a_jepa_runs_and_resumes_exactly(tmp_path):
    """The train loop: masks and EMA ride on its determinism (a run resumed from a checkpoint continues exactly),
    the target encoder is saved in model.safetensors, no sample grid is attempted."""
    import shutil

    from accelerate.state import AcceleratorState

    from ditk.train import prepare_run_dir, train


    def run(folder):
        AcceleratorState._reset_state(reset_partial_state=True)
        cfg = resolve("a-jepa-tiny", [*TRAIN_TINY, "train.max_steps=4", "run.name=full", f"run.dir={tmp_path}"])
        path = tmp_path / folder
        assert train(prepare_run_dir(cfg, path, None), path, progress=False) == 0
        return path

    full = run("full")
    # The same run interrupted after its step-2 checkpoint: resuming it must give the same steps 3 and 4.
    shutil.copytree(full, tmp_path / "part")
    shutil.rmtree(tmp_path / "part" / "checkpoints" / "step-000004")
    (tmp_path / "part" / "checkpoints" / "latest").write_text("step-000002\n")
    part = run("part")
    losses = [[json.loads(line)["loss"] for line in (p / "metrics.jsonl").read_text().splitlines()]
              for p in (full, part)]
    assert losses[0] == losses[1] and len(losses[0]) == 4
    a = load_file(full / "checkpoints" / "step-000004" / "model.safetensors")
    b = load_file(part / "checkpoints" / "step-000004" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("target_encoder.") for k in a) and any(k.startswith("predictor.") for k in a)
    enc = {k[len("encoder."):]: v for k, v in a.items() if k.startswith("encoder.")}
    tgt = {k[len("target_encoder."):]: v for k, v in a.items() if k.startswith("target_encoder.")}
    assert enc.keys() == tgt.keys() and any(not torch.equal(enc[k], tgt[k]) for k in enc)
    assert not (full / "samples").exists()


def test_sampling_an_a_jepa_run_says_it_is_not_generative(tmp_path):
    from ditk_testing import invoke_ditk

    invoke_ditk("train", "a-jepa-tiny", *TRAIN_TINY, "train.max_steps=1", f"run.dir={tmp_path}", "--no-progress",
                check=True)
    proc = invoke_ditk("sample", tmp_path / "a-jepa-tiny", "--num", "2", "--no-progress")
    assert proc.returncode == 2
    assert "not a generative model" in proc.stderr and "--modality audio" in proc.stderr


def test_objective_and_model_must_go_together():
    obj = tiny_objective()
    with pytest.raises(ConfigError, match="model.name=a-jepa"):
        obj.begin_step(torch.nn.Linear(2, 2), 0, 10)
    with pytest.raises(ConfigError, match="objective.momentum"):
        tiny_objective(momentum=[1.0, 0.9])
    with pytest.raises(ConfigError, match="multiples of"):
        tiny_model(frames=30)
