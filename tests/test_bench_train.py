"""benchmarks/bench_train.py: a one-step CPU dry run of the harness (the GPU table uses the same code)."""

import importlib.util
import json
from pathlib import Path

from ditk_testing import TINY


def test_bench_train_dry_run_writes_its_table_and_json(tmp_path, capsys):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    tiny_model = [o for o in TINY if o.startswith("model.")]
    result = bench.main(["--preset", "digits-dit", "--batch", "4", "--steps", "1", "--warmup", "0", "--device", "cpu",
                         "--variant", "loop:optim.impl=loop",
                         "--variant", "ckpt:train.activation_checkpointing=true,train.mixed_precision=bf16",
                         "--variant", "medium:runtime.matmul_precision=medium",
                         "--json", str(out), *tiny_model])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"loop", "ckpt", "medium"} and rows["loop"]["ratio"] == 1.0
    # each row's precision is its own config's; MFU against a matmul ceiling measured in that precision
    assert [rows[v]["precision"] for v in ("loop", "ckpt", "medium")] == ["fp32", "bf16", "fp32/medium"]
    assert set(result["matmul_ceiling_gflops"]) == {"fp32", "bf16", "fp32/medium"}
    assert __import__("torch").get_float32_matmul_precision() == "highest"  # the harness leaves torch's default
    for r in rows.values():
        assert r["step_ms"] > 0 and abs(r["images_per_s"] - 4e3 / r["step_ms"]) < 1e-6
        assert 0 <= r["data_wait_ms"] < r["step_ms"] and r["params"] == rows["loop"]["params"]
        assert r["model_gflop"] == result["model_gflop_per_step"] > 0 and 0 < r["mfu"] < 1
    table = capsys.readouterr().out
    assert "step ms" in table and "ckpt" in table


def test_bench_train_suite_runs_each_preset_in_both_precisions(tmp_path):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train_suite", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tiny_model = [o for o in TINY if o.startswith("model.")]
    result = bench.main(["--suite", "digits-dit", "--batch", "2", "--steps", "1", "--warmup", "0", "--device", "cpu",
                         "--variant", "eager:train.compile=none", "--json", str(tmp_path / "s.json"), *tiny_model])
    assert [(r["preset"], r["precision"]) for r in result] == [("digits-dit", "fp32"), ("digits-dit", "bf16")]
    assert json.loads((tmp_path / "s.json").read_text())[1]["rows"][0]["variant"] == "eager"


def test_bench_train_vae_rows_encode_pixels_with_a_real_size_sd_vae(tmp_path):
    """--vae: each variant also runs on pixels encoded at every step by a random-weight SD-VAE of the real
    architecture (sd-vae-ft-ema has 83,653,863 parameters)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_train.py"
    spec = importlib.util.spec_from_file_location("bench_train_vae", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tiny_model = [o for o in TINY if o.startswith("model.")]
    result = bench.main(["--preset", "digits-dit", "--batch", "1", "--steps", "1", "--warmup", "0", "--device", "cpu",
                         "--vae", *tiny_model, "model.in_channels=4"])  # 8x8x4 latents <- 64x64x3 pixels
    assert result["vae_params"] == 83_653_863
    assert [r["variant"] for r in result["rows"]] == ["ditk", "ditk+vae"]
    assert result["rows"][1]["params"] == result["rows"][0]["params"]
