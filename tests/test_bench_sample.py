"""benchmarks/bench_sample.py: a CPU dry run of the harness (tiny DiT, a few steps; the GPU table uses the same code)."""

import importlib.util
import json
from pathlib import Path

from ditk_testing import TINY


def test_bench_sample_dry_run_writes_its_table_and_json(tmp_path, capsys):
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_sample.py"
    spec = importlib.util.spec_from_file_location("bench_sample", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = tmp_path / "bench.json"
    tiny_model = [o for o in TINY if o.startswith("model.")]
    result = bench.main(["--preset", "digits-dit", "--steps", "3", "--batch", "2", "--device", "cpu", "--repeats", "1",
                         "--cfg-scale", "2", "--variant", "eager:", "--variant", "fora:sample.cache=fora,sample.steps=4",
                         "--json", str(out), *tiny_model])
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    rows = {r["variant"]: r for r in result["rows"]}
    assert set(rows) == {"eager", "fora"} and rows["eager"]["ratio"] == 1.0
    # NFE: one denoiser call per step (the guided pair is one call on the doubled batch), cache or not
    assert rows["eager"]["nfe"] == 3 and rows["fora"]["nfe"] == 4 and rows["fora"]["cache"] == "fora"
    for r in rows.values():
        assert r["seconds"] > 0 and abs(r["images_per_s"] - 2 / r["seconds"]) < 1e-9
        assert abs(r["ms_per_step"] - r["seconds"] / r["steps"] * 1e3) < 1e-9 and r["cfg_scale"] == 2.0
    table = capsys.readouterr().out
    assert "ms/step" in table and "fora" in table


def test_bench_sample_suite_dry_run(tmp_path):
    """The GPU table's command on CPU: every preset in fp32 and bf16 (autocast on CPU too)."""
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "bench_sample.py"
    spec = importlib.util.spec_from_file_location("bench_sample_suite", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    tiny_model = [o for o in TINY if o.startswith("model.")]
    result = bench.main(["--suite", "digits-dit", "--steps", "2", "--batch", "1", "--repeats", "1", "--warmup", "0",
                         "--device", "cpu", "--variant", "eager:sample.compile=false", "--json",
                         str(tmp_path / "s.json"), *tiny_model])
    assert [(r["preset"], r["precision"]) for r in result] == [("digits-dit", "fp32"), ("digits-dit", "bf16")]
    rows = [table["rows"][0] for table in json.loads((tmp_path / "s.json").read_text())]
    assert [r["precision"] for r in rows] == ["fp32", "bf16"]
    for row in rows:
        assert row["variant"] == "eager" and row["solver"] == "ddpm" and row["cfg_scale"] == 4.0 and row["nfe"] == 2
