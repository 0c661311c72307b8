"""The command line as scripts use it: fast help, presets, exit codes, completions."""

import subprocess
import sys
from pathlib import Path

import pytest

from ditk_testing import run_ditk

REPO = Path(__file__).resolve().parents[1]


def test_help_and_completion_do_not_import_torch(tmp_path):
    code = ("import sys; from ditk.cli import cli\n"
            "for args in (['--help'], ['train', '--help'], ['sample', '--help'], ['presets', 'list']):\n"
            "    cli.main(args=args, standalone_mode=False)\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr


def test_help_lists_the_commands(tmp_path):
    out = run_ditk("--help", cwd=tmp_path, check=True).stdout
    for name in ("train", "sample", "presets", "evaluate-fid"):
        assert name in out


def test_presets_list_works_from_any_directory(tmp_path):
    names = run_ditk("presets", "list", cwd=tmp_path, check=True).stdout.split()
    assert "dit-xl-2" in names and "digits-dit" in names and "_dit-imagenet-256" not in names


def test_presets_show_resolves_and_counts_parameters(tmp_path):
    out = run_ditk("presets", "show", "dit-xl-2", cwd=tmp_path, check=True).stdout
    assert "depth: 28" in out and "hidden_size: 1152" in out
    assert "# parameters: 675,129,632" in out  # DiT-XL/2 (paper: 675M)


@pytest.mark.parametrize("args, message", [
    (["train", "no-such-preset"], "error: unknown preset 'no-such-preset'"),
    (["train", "digits-dit", "model.dpth=3"], "did you mean 'model.depth'?"),
    (["train", "dit-s-2", "autoencoder.path=/x"], "missing required key 'data.path'"),
    (["sample", "/no/such/run"], "does not exist"),
    (["train", "missing.yaml"], "preset file 'missing.yaml' does not exist"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, args, message):
    proc = run_ditk(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stdout == ""
    assert not (tmp_path / "runs").exists()  # nothing written


def test_completion_scripts_are_up_to_date():
    for shell in ("bash", "zsh", "fish"):
        proc = run_ditk(env={"_DITK_COMPLETE": f"{shell}_source"})
        assert proc.stdout == (REPO / "completions" / f"ditk.{shell}").read_text(), (
            f"completions/ditk.{shell} is stale: regenerate with "
            f"_DITK_COMPLETE={shell}_source ditk > completions/ditk.{shell}")


def test_completion_offers_preset_names():
    proc = run_ditk(env={"_DITK_COMPLETE": "bash_complete", "COMP_WORDS": "ditk train dit-xl", "COMP_CWORD": "2"})
    assert "plain,dit-xl-2" in proc.stdout and "plain,dit-xl-2-512" in proc.stdout
