"""Prefix-diffusion captioning: data, rounding, the Diffusion-LM loss, training, resume, sampling, CLI errors."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from ditk_testing import invoke_ditk
from ditk.config import resolve
from ditk.train import prepare_run_dir, train

# A captioner small enough to learn the digits' class words in 300 steps (~30 s on a busy 2-core CPU).
TINY = ["model.hidden_size=64", "model.depth=2", "model.num_heads=2", "model.prefix_len=2", "model.mapping_depth=0",
        "conditioner.cells=false", "train.global_batch_size=32", "train.log_every=1", "train.ckpt_every=1000",
        "optim.lr=2e-3", "optim.warmup_steps=20", "train.ema_decay=0.99", "sample.num=4", "sample.steps=5"]


def _train(root: Path, name: str, steps: int, preset: str = "digits-caption", extra=(), tiny=TINY) -> Path:
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)
    cfg = resolve(preset, [*tiny, f"train.max_steps={steps}", f"run.name={name}", f"run.dir={root}", *extra])
    path = root / name
    cfg = prepare_run_dir(cfg, path, None)
    assert train(cfg, path, progress=False) == 0
    return path


def _losses(run: Path):
    return [json.loads(l)["loss"] for l in (run / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    return _train(tmp_path_factory.mktemp("caption"), "learn", 300, extra=["train.log_every=50"])


# ---------------------------------------------------------------------------------------------------------- data

def test_attributes_are_measured_from_the_pixels():
    from ditk.data.digits_caption import measure

    blank = np.zeros((3, 8, 8))
    blank[0, :, 3] = 16  # a vertical bar
    for y in range(8):
        blank[1, y, 7 - y] = 16  # top to the right: leaning right
        blank[2, y, y] = 16  # top to the left: leaning left
    m = measure(blank)
    assert abs(m["slant"][0]) < 1e-9 and m["slant"][1] > 0.5 and m["slant"][2] < -0.5
    thick = blank[:1].copy()
    thick[0, :, 4] = 16
    assert measure(thick)["thickness"][0] == 2 * m["thickness"][0]


def test_captions_name_the_class_and_the_splits_are_disjoint():
    from ditk.data.digits_caption import DigitsCaption, class_word

    train_set, test_set = DigitsCaption("train"), DigitsCaption("test")
    assert not set(train_set.indices) & set(test_set.indices)
    for refs, y in zip(test_set.references, test_set.labels.tolist()):
        assert len(set(refs)) == 4 and all(class_word(r) == y for r in refs)
    ids, image = train_set[0]
    text = train_set.tokenizer.decode(ids, skip_special_tokens=True)
    assert text.replace(" ,", ",").replace(" :", ":") in train_set.references[0] and image.shape == (1, 8, 8)


# ------------------------------------------------------------------------------------------- rounding and loss

def test_rounding_maps_a_clean_embedding_back_to_its_token():
    from ditk.models.caption_dit import CaptionDiT

    torch.manual_seed(0)
    vocab = [0, 101, 102, 1010, 2028, 2048, 2093]
    model = CaptionDiT(vocab_ids=vocab, embed_dim=16, seq_len=8, hidden_size=32, depth=1, num_heads=2)
    ids = torch.tensor([[101, 2028, 1010, 2093, 102, 0, 0, 0]])
    x = model.embed(ids)
    assert torch.equal(model.word_embedding.rows_to_ids(model.word_embedding.nearest(x)), ids)
    assert torch.equal(model.clamp(x), x)
    noisy = x + 0.01 * torch.randn_like(x)
    assert torch.equal(model.clamp(noisy), x)  # small noise rounds back too
    with pytest.raises(Exception, match="not in the model's vocabulary"):
        model.embed(torch.tensor([[7592]]))


def test_sqrt_schedule_is_diffusion_lms_closed_form():
    from ditk.objectives.diffusion_lm import DiffusionLM

    obj = DiffusionLM()
    T = obj.num_timesteps
    t = np.arange(T)
    expected = (1 - np.sqrt((t + 1) / T + 1e-4)) / (1 - np.sqrt(1e-4))  # alpha_bar((t+1)/T) / alpha_bar(0)
    np.testing.assert_allclose(obj.alphas_cumprod.numpy()[:-1], expected[:-1], rtol=1e-10)
    assert obj.betas_np[-1] == 0.999  # alpha_bar(1) < 0: the last beta is capped, as in Diffusion-LM


def test_diffusion_lm_loss_matches_its_formula():
    """mse (x0 target; mu at t = 0) + tT (prior) + rounding NLL, recomputed by hand for a model that outputs 0."""
    from ditk.models.caption_dit import WordEmbedding
    from ditk.objectives.diffusion_lm import DiffusionLM

    class Zero(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.word_embedding = WordEmbedding(10, 4)
            self.latent_shape = (3, 4)

        def embed(self, ids):
            return self.word_embedding(ids)

        def logits(self, x):
            return self.word_embedding.logits(x)

        def targets(self, ids):
            return self.word_embedding.ids_to_rows(ids)

        def forward(self, x, t, **kw):
            return torch.zeros_like(x)

    torch.manual_seed(0)
    obj, model = DiffusionLM(), Zero()
    ids = torch.tensor([[1, 2, 3], [4, 5, 6]])
    t = torch.tensor([0, 700])
    noise = torch.randn(2, *obj.noise_shape(model))
    out = obj.training_losses(model, ids, t, noise)
    ab = obj.alphas_cumprod.double()
    mu = model.word_embedding.weight.detach().double()[ids]
    x0 = mu + math.sqrt(1 - ab[0]) * noise[:, 1].double()
    mse = torch.stack([(mu[0] ** 2).mean(), (x0[1] ** 2).mean()])
    t_T = ab[-1] * (x0 ** 2).mean(dim=(1, 2))
    nll = -F.log_softmax(x0 @ model.word_embedding.weight.detach().double().t(), -1).gather(-1, ids[..., None])[..., 0].mean(-1)
    torch.testing.assert_close(out["loss"].double(), mse + t_T + nll, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------- training and sampling

def test_a_few_hundred_steps_name_the_right_digit(trained):
    """Class-word accuracy on 30 held-out digits after 300 steps must be >= 0.5 (chance 0.1; measured 0.83)."""
    from ditk.caption.generate import caption_images, held_out
    from ditk.caption.metrics import class_word_accuracy
    from ditk.generate import load_pipeline

    pipe = load_pipeline(str(trained), overrides=["sample.steps=20", "sample.solver=ddim"])
    images, refs, labels, class_of = held_out(pipe.cfg, 30)
    groups = caption_images(pipe, images, list(range(30)), 1)
    acc = class_word_accuracy([g[0] for g in groups], labels, class_of)
    assert acc >= 0.5, groups
    # the learned rounding head (the LM head tied to the table) maps every clean embedding back to its token
    model = pipe.model
    ids = model.word_embedding.row_ids[None]
    assert torch.equal(model.round(model.embed(ids)), ids)


def test_sampling_is_deterministic_per_seed_and_independent_of_the_batch(trained):
    from ditk.caption.generate import caption_images
    from ditk.data.digits_caption import DigitsCaption
    from ditk.generate import load_pipeline

    images = DigitsCaption("test").images[:3]
    big = load_pipeline(str(trained), overrides=["sample.steps=8", "sample.batch_size=64"])
    small = load_pipeline(str(trained), overrides=["sample.steps=8", "sample.batch_size=2"])
    a = caption_images(big, images, [0, 1, 2], 3)
    assert a == caption_images(small, images, [0, 1, 2], 3)
    assert caption_images(small, images[2:], [2], 3) == a[2:]  # image 2 alone: the same captions
    other = load_pipeline(str(trained), overrides=["sample.steps=8", "sample.seed=1"])
    assert caption_images(other, images, [0, 1, 2], 3) != a


def test_resume_is_exact(tmp_path):
    full = _train(tmp_path, "full", 6, extra=["train.ckpt_every=3"])
    part = _train(tmp_path, "part", 3, extra=["train.ckpt_every=3"])
    part = _train(tmp_path, "part", 6, extra=["train.ckpt_every=3"])
    assert _losses(part) == _losses(full)
    a = load_file(full / "checkpoints" / "step-000006" / "model.safetensors")
    b = load_file(part / "checkpoints" / "step-000006" / "model.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_autoregressive_baseline_trains_and_captions(tmp_path):
    from ditk.caption.generate import caption_images
    from ditk.data.digits_caption import DigitsCaption
    from ditk.generate import load_pipeline

    run = _train(tmp_path, "ar", 4, preset="digits-caption-ar")
    assert _losses(run)[-1] < _losses(run)[0]
    pipe = load_pipeline(str(run))
    images = DigitsCaption("test").images[:2]
    a = caption_images(pipe, images, [0, 1], 2)
    assert a == caption_images(pipe, images, [0, 1], 2) and len(a) == 2 and len(a[0]) == 2


# ----------------------------------------------------------------------------------------------------- the CLI

def _digit_png(path: Path, size: int = 8) -> Path:
    from PIL import Image

    from ditk.data.digits_caption import DigitsCaption

    x = DigitsCaption("test").images[0, 0]
    arr = ((x + 1) * 127.5).round().byte().numpy()
    Image.fromarray(arr, "L").resize((size, size), Image.NEAREST).save(path)
    return path


def test_sample_images_writes_jsonl_sheet_and_report(trained, tmp_path):
    a, b = _digit_png(tmp_path / "a.png"), _digit_png(tmp_path / "b.png")
    out = tmp_path / "out"
    r = invoke_ditk("sample", trained, "--images", a, b, "--num-captions", 2, "--steps", 5, "--out", out,
                    "--no-progress", check=True)
    assert r.stdout.strip() == str(out)
    lines = [json.loads(l) for l in (out / "captions.jsonl").read_text().splitlines()]
    assert [l["image"] for l in lines] == [str(a), str(b)] and all(len(l["captions"]) == 2 for l in lines)
    assert [l["seed"] for l in lines] == [[0, 0], [0, 1]]
    report = json.loads((out / "report.json").read_text())
    assert {"distinct_1", "distinct_2", "self_bleu"} <= set(report["captioning"])
    assert (out / "contact_sheet.png").is_file()
    invoke_ditk("sample", trained, "--num", 4, "--num-captions", 2, "--steps", 5, "--out", tmp_path / "held",
                "--no-progress", check=True)
    assert {"bleu4", "class_word_accuracy"} <= set(json.loads((tmp_path / "held" / "report.json").read_text())["captioning"])


def test_bad_inputs_are_one_line_errors(trained, tmp_path):
    big = _digit_png(tmp_path / "big.png", size=32)
    r = invoke_ditk("sample", trained, "--images", big, "--out", tmp_path / "o1")
    assert r.returncode == 2 and "--resize" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o1").exists()
    r = invoke_ditk("sample", trained, "--images", big, "--resize", "--steps", 3, "--out", tmp_path / "o2", "--no-progress")
    assert r.returncode == 0, r.stderr
    r = invoke_ditk("sample", trained, "--images", big, "--num-captions", 0, "--out", tmp_path / "o3")
    assert r.returncode == 2 and "--num-captions" in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = invoke_ditk("sample", trained, "--images", tmp_path / "missing.png")
    assert r.returncode == 2 and "does not exist" in r.stderr
    r = invoke_ditk("evaluate-fid", "--run", trained, "--num", 4)
    assert r.returncode == 2 and "captioning run" in r.stderr and "Traceback" not in r.stderr
    r = invoke_ditk("train", "digits-caption", "conditioner.name=clip-image", f"conditioner.encoder_path={tmp_path / 'nope'}",
                    f"run.dir={tmp_path / 'runs'}", "model.feature_dim=512")
    errors = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert r.returncode == 2 and len(errors) == 1 and "encoder_path" in errors[0] and "Traceback" not in r.stderr


def _tiny_clip(folder: Path) -> Path:
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                              num_attention_heads=2, projection_dim=16)
    CLIPVisionModelWithProjection(config).save_pretrained(folder)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder


def _tiny_coco(root: Path) -> Path:
    from PIL import Image

    for split, n in (("train2017", 3), ("val2017", 2)):
        (root / split).mkdir(parents=True)
        images, anns = [], []
        for i in range(n):
            Image.fromarray(np.full((40, 60, 3), 40 * i, dtype=np.uint8)).save(root / split / f"{i:012d}.jpg")
            images.append({"id": i, "file_name": f"{i:012d}.jpg"})
            anns += [{"id": 10 * i + j, "image_id": i, "caption": f"a {'dark' if i == 0 else 'grey'} picture number {j}"}
                     for j in range(2)]
        (root / "annotations").mkdir(exist_ok=True)
        (root / "annotations" / f"captions_{split}.json").write_text(json.dumps({"images": images, "annotations": anns}))
    return root


def test_clip_encoder_and_coco_folder_train_and_caption(tmp_path):
    """The paper presets' path at a tiny size: CLIP image embeddings (a random tiny CLIP saved to a folder) and a
    COCO-layout caption folder, through train and `ditk sample` (BLEU-4 against val2017's references)."""
    clip, coco = _tiny_clip(tmp_path / "clip"), _tiny_coco(tmp_path / "coco")
    args = ["conditioner.name=clip-image", f"conditioner.encoder_path={clip}", "model.feature_dim=16",
            "data.name=coco-captions", f"data.path={coco}", "data.image_size=32", "data.seq_len=12",
            "model.seq_len=12", "model.vocab_ids=[]", "train.global_batch_size=4"]
    run = _train(tmp_path, "coco", 2, extra=args, tiny=[a for a in TINY if not a.startswith("conditioner.")])
    invoke_ditk("sample", run, "--num", 2, "--num-captions", 2, "--steps", 3, "--out", tmp_path / "o",
                "--no-progress", check=True)
    report = json.loads((tmp_path / "o" / "report.json").read_text())["captioning"]
    assert "bleu4" in report and "class_word_accuracy" not in report
    png = tmp_path / "x.png"
    from PIL import Image

    Image.fromarray(np.zeros((50, 70, 3), dtype=np.uint8)).save(png)  # CLIP resizes any size itself
    invoke_ditk("sample", run, "--images", png, "--steps", 3, "--out", tmp_path / "o2", "--no-progress", check=True)


@pytest.mark.slow
def test_two_processes_match_one(tmp_path):
    """DDP over 2 CPU processes (gloo): the embedding table and LM head used outside forward (by the objective)
    still get the all-reduced gradients, so 2 processes compute the updates of 1."""
    from ditk_testing import run_ditk, torchrun

    common = ["digits-caption", *TINY, "train.max_steps=3", "--no-progress"]
    run_ditk("train", *common, f"run.dir={tmp_path / 'one'}", check=True)
    torchrun("-m", "ditk", "train", *common, f"run.dir={tmp_path / 'two'}", timeout=300)
    a = load_file(tmp_path / "one" / "digits-caption" / "checkpoints" / "step-000003" / "model.safetensors")
    b = load_file(tmp_path / "two" / "digits-caption" / "checkpoints" / "step-000003" / "model.safetensors")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-5)
