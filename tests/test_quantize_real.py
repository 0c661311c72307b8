"""`ditk quantize` real (torchao) schemes: folder round trip in a fresh process, digits-model error bound,
`ditk sample` on the output, one-line refusals."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from ditk_testing import invoke_ditk

SCHEMES = ["int8-wo", "int8-dq", "intx-wo", "fp8-wo"]


def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(4, 1, 8, 8, generator=g), torch.tensor([10, 300, 600, 999]), torch.tensor([1, 3, 5, 7])


def _digits_model():
    """The digits-dit architecture with every weight random (the zero-initialised adaLN / output layers too),
    so that the output depends on all quantized layers."""
    from ditk.build import build_model
    from ditk.config import resolve

    torch.manual_seed(0)
    model = build_model(resolve("digits-dit", [], allow_missing=("data",))).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad and ("adaLN" in name or "final_layer" in name):
                p.normal_(0, 0.02)
    return model


def test_int8_weight_only_digits_model_error_is_below_one_percent():
    from ditk.quantize import real
    from ditk.quantize.layers import select_linears

    model = _digits_model()
    x, t, y = _inputs()
    with torch.no_grad():
        ref = model(x, t, y)
        layers, kept = select_linears(model)
        assert len(layers) == 16 and all("adaLN" in n or "final" in n or "t_embedder" in n for n in kept)
        real.apply(model, real.QUANT_SCHEMES.get("int8-wo").builder(torch.device("cpu")), layers)
        out = model(x, t, y)
    rel = float((out - ref).norm() / ref.norm())
    # int8 per-channel weights: each weight within scale/2 = max|W_row| / 254; measured 0.3 % here
    assert 0 < rel < 0.01, rel
    assert type(model.blocks[0].attn.qkv.weight).__name__ == "Int8Tensor"
    assert type(model.blocks[0].adaLN_modulation[1].weight) is torch.nn.Parameter  # kept in fp32 by default


def test_round_trip_in_a_fresh_process_gives_identical_outputs(trained_run, tmp_path):
    from ditk.quantize.api import quantize

    x, t, y = _inputs()
    expected = {}
    for scheme in SCHEMES:
        folder, manifest, model = quantize(str(trained_run), scheme=scheme, out=str(tmp_path / scheme), progress=False)
        with torch.no_grad():
            expected[scheme] = model(x, t, y)
        assert manifest["kind"] == "real" and manifest["backend"] == "torchao"
        assert manifest["size_bytes"]["after"] < manifest["size_bytes"]["before"]
    code = f"""
import sys, torch
from ditk.generate import load_pipeline
g = torch.Generator().manual_seed(0)
x, t, y = torch.randn(4, 1, 8, 8, generator=g), torch.tensor([10, 300, 600, 999]), torch.tensor([1, 3, 5, 7])
out = {{}}
for s in {SCHEMES!r}:
    pipe = load_pipeline({str(tmp_path)!r} + "/" + s, device="cpu")
    with torch.no_grad():
        out[s] = pipe.model(x, t, y)
torch.save(out, {str(tmp_path / "fresh.pt")!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, timeout=120)
    fresh = torch.load(tmp_path / "fresh.pt", weights_only=True)
    for scheme in SCHEMES:
        assert torch.equal(fresh[scheme], expected[scheme]), scheme


def test_sample_and_manifest_of_a_quantized_folder(trained_run, tmp_path):
    out = tmp_path / "q"
    proc = invoke_ditk("quantize", trained_run, "--scheme", "intx-wo", "--wbits", "4", "--group-size", "16", "--out", out,
                       check=True)
    assert proc.stdout.strip() == str(out)
    manifest = json.loads((out / "quantization.json").read_text())
    assert manifest["layers"]["blocks.0.mlp.fc1"] == {"weight_dtype": "int4", "bits": 4, "group_size": 16}
    assert "blocks.0.adaLN_modulation.1" in manifest["excluded_layers"]
    lineage = json.loads((out / "lineage.json").read_text())
    assert lineage["parent"] == str(trained_run.resolve())
    invoke_ditk("sample", out, "--num", "2", "--out", tmp_path / "s", "--no-progress", check=True)
    report = json.loads((tmp_path / "s" / "report.json").read_text())
    assert report["model"]["quantization"]["scheme"] == "intx-wo"
    assert np.load(tmp_path / "s" / "samples.npz")["arr_0"].shape == (2, 8, 8, 1)


@pytest.mark.parametrize("args, words", [
    (["--scheme", "fp8-dq"], "compute capability >= 8.9"),
    (["--scheme", "int8-wo", "--wbits", "4"], "intx-wo"),
    (["--scheme", "intx-wo", "--group-size", "7"], "does not divide"),
    (["--simulate", "rtn", "--calib-num", "0"], "calibration"),
    ([], "exactly one of"),
    (["--simulate", "svdquant", "--opt", "rnak=4"], "has no option 'rnak'"),
    (["--scheme", "int8-wo", "--opt", "rank=4"], "--opt is for --simulate"),
])
def test_bad_input_is_one_line_and_exit_2(trained_run, tmp_path, args, words):
    if "fp8-dq" in args and torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9):
        pytest.skip("this machine can run fp8-dq")
    proc = invoke_ditk("quantize", trained_run, *args, "--out", tmp_path / "q", "--device", "cpu")
    assert proc.returncode == 2 and words in proc.stderr
    lines = proc.stderr.strip().splitlines()  # (torchao's import may log warnings before the error)
    assert lines[-1].startswith("error:") and words in lines[-1] and "Traceback" not in proc.stderr
    assert not (tmp_path / "q").exists()


def test_quantizing_a_quantized_folder_is_refused(trained_run, tmp_path):
    invoke_ditk("quantize", trained_run, "--scheme", "int8-wo", "--out", tmp_path / "q", check=True)
    for source in (tmp_path / "q", tmp_path / "q" / "checkpoints" / "step-000006"):
        proc = invoke_ditk("quantize", source, "--scheme", "int8-wo", "--out", tmp_path / "qq")
        assert proc.returncode == 2 and "already a `ditk quantize` output" in proc.stderr
    assert not (tmp_path / "qq").exists()


def test_refusals_before_loading_do_not_import_torch(trained_run, tmp_path):
    invoke_ditk("quantize", trained_run, "--scheme", "int8-wo", "--out", tmp_path / "q", check=True)
    code = ("import sys; from ditk.cli import cli; from ditk.errors import DitkError\n"
            f"for args in (['quantize', {str(tmp_path / 'q')!r}, '--scheme', 'int8-wo'],\n"
            f"             ['quantize', {str(trained_run)!r}, '--simulate', 'rtn', '--calib-num', '0']):\n"
            "    try:\n"
            "        cli.main(args=args, standalone_mode=False)\n"
            "        raise SystemExit('not refused')\n"
            "    except DitkError:\n"
            "        pass\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_a_quantized_folder_refuses_model_weights_and_training_in_one_line(tmp_path):
    """It holds only quantized EMA weights: `--weights model` and `ditk train` say so (exit 2), not "damaged"."""
    from ditk_testing import TINY, invoke_ditk

    invoke_ditk("train", "digits-dit", *TINY, "train.max_steps=2", f"run.dir={tmp_path}", "--no-progress", check=True)
    out = invoke_ditk("quantize", tmp_path / "digits-dit", "--scheme", "int8-wo", "--no-progress", check=True)
    folder = out.stdout.strip()
    for args in (["sample", folder, "--weights", "model", "--num", "2"],
                 ["train", f"{folder}/config.yaml", "--run-dir", folder]):
        proc = invoke_ditk(*args, "--no-progress")
        assert proc.returncode == 2 and "is a `ditk quantize` output" in proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1
