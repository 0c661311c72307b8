"""`ditk restore` end to end on tiny digits priors (a few training steps), and its one-line input errors."""

import json

import pytest

from ditk_testing import TINY, invoke_ditk


@pytest.fixture(scope="module")
def clean_digits(tmp_path_factory):
    from ditk.data.digits import Digits
    from ditk.io import save_pngs

    folder = tmp_path_factory.mktemp("digits")
    save_pngs(Digits(split="test").images[:3], folder)
    return folder


@pytest.fixture(scope="module")
def flow_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("flowruns")
    invoke_ditk("train", "digits-dit-flow", *TINY, "train.max_steps=3", f"run.dir={root}", "--no-progress", check=True)
    return root / "digits-dit-flow"


@pytest.mark.parametrize("method, extra", [("ddnm", ["--method-opt", "svd=true"]), ("dps", []), ("pigdm", []), ("ddrm", [])])
def test_restore_end_to_end(trained_run, clean_digits, tmp_path, method, extra):
    out = tmp_path / "out"
    proc = invoke_ditk("restore", trained_run, clean_digits, "--task", "sr2", "--method", method, "--degrade",
                       "--sigma-y", "0.05", "--steps", "4", "--out", out, "--no-progress", *extra, check=True)
    assert proc.stdout == f"{out}\n"
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == method and report["nfe_per_image"] == 4 and report["num"] == 3
    assert report["task"]["task"] == "sr2" and report["sigma_y"] == 0.05
    assert set(report["metrics"]) >= {"psnr_db", "ssim", "fid", "kid"}
    # FID/KID of the restored set against the truth, in the features of the extractor made for the digits
    assert report["metrics"]["fid_protocol"]["extractor"] == "digits" and report["metrics"]["fid_protocol"]["n"] == 3
    assert isinstance(report["metrics"]["kid"], float)
    for sub in ("restored", "degraded", "ground_truth"):
        assert len(list((out / sub).glob("*.png"))) == 3
    assert (out / "grid.png").is_file() and (out / "samples.npz").is_file()
    assert json.loads((out / "lineage.json").read_text())["parent"].startswith("digits-dit")


def test_restore_with_a_flow_prior_and_degraded_inputs(flow_run, clean_digits, tmp_path):
    from PIL import Image

    low = tmp_path / "low"
    low.mkdir()
    for f in sorted(clean_digits.glob("*.png")):
        Image.open(f).resize((4, 4), Image.BOX).save(low / f.name)
    out = tmp_path / "out"
    invoke_ditk("restore", flow_run, low, "--task", "sr2", "--steps", "3", "--method-opt", "samples=2", "--out", out,
                "--no-progress", check=True)
    report = json.loads((out / "report.json").read_text())
    assert report["method"] == "pnp-flow" and report["nfe_per_image"] == 6  # 3 steps x 2 samples
    assert "metrics" not in report  # no ground truth
    # 8x8 inputs for sr2 on an 8x8 model: refused unless --resize
    proc = invoke_ditk("restore", flow_run, clean_digits, "--task", "sr2", "--steps", "2", "--out", tmp_path / "o2")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "--resize" in proc.stderr
    assert not (tmp_path / "o2").exists()
    invoke_ditk("restore", flow_run, clean_digits, "--task", "sr2", "--steps", "2", "--resize", "--out", tmp_path / "o2",
                "--method-opt", "samples=1", "--no-progress", check=True)


@pytest.mark.parametrize("args, message", [
    (["--task", "sr-4"], "unknown task 'sr-4': did you mean"),
    (["--task", "sr2", "--method", "pnp-flow"], "method pnp-flow needs a rectified-flow prior"),
    (["--task", "sr2", "--method", "ddnmm"], "did you mean 'ddnm'"),
    (["--task", "sr2", "--sigma-y", "-0.1"], "'--sigma-y': -0.1 is not in the range x>=0"),
    (["--task", "sr2", "--method-opt", "zeta=1"], "method ddnm has no option 'zeta'"),
    (["--task", "blur", "--task-opt", "sigma=0"], "sigma must be > 0"),
    (["--task", "colorize"], "colorize needs RGB images"),
    (["--task", "sr2", "--degrade", "model.dpth=3"], "unknown key 'model.dpth'"),
    (["--task", "sr2", "--degrade", "--fid-extractor", "photoss"], "did you mean 'photos'"),
])
def test_bad_input_is_one_line_exit_2(trained_run, clean_digits, tmp_path, args, message):
    out = tmp_path / "out"
    proc = invoke_ditk("restore", trained_run, clean_digits, *args, "--out", out)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert message in proc.stderr
    assert not out.exists()


def test_existing_output_is_kept(trained_run, clean_digits, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = invoke_ditk("restore", trained_run, clean_digits, "--task", "sr2", "--degrade", "--out", out)
    assert proc.returncode == 2 and "--overwrite" in proc.stderr
    assert (out / "keep.txt").read_text() == "mine"
