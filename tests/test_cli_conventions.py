"""One set of CLI conventions for every command, present and future: one error style (one line, exit 2),
positional KEY=VALUE overrides, help text on every option, bounded numeric options."""

import subprocess
import sys

import click
import pytest

from ditk_testing import invoke_ditk

# Leaf commands that take no config (nothing to override).
NO_OVERRIDES = {"presets list"}


def leaf_commands():
    from ditk.cli import COMMANDS, cli

    ctx = click.Context(cli)
    for name in COMMANDS:
        cmd = cli.get_command(ctx, name)
        if isinstance(cmd, click.Group):
            for sub in cmd.list_commands(ctx):
                yield f"{name} {sub}", cmd.get_command(ctx, sub)
        else:
            yield name, cmd


def test_every_option_has_help_and_every_number_is_bounded():
    from click.types import FloatParamType, IntParamType, _NumberRangeBase

    for path, cmd in leaf_commands():
        for param in cmd.params:
            if isinstance(param, click.Option):
                assert param.help, f"ditk {path} {param.opts[0]} has no help text"
                if isinstance(param.type, (IntParamType, FloatParamType)):
                    assert isinstance(param.type, _NumberRangeBase), f"ditk {path} {param.opts[0]} is unbounded"


def test_every_command_takes_positional_overrides():
    for path, cmd in leaf_commands():
        if path in NO_OVERRIDES:
            continue
        variadic = [p for p in cmd.params if isinstance(p, click.Argument) and p.nargs == -1]
        assert variadic and "KEY=VALUE" in (variadic[0].metavar or ""), f"ditk {path} takes no KEY=VALUE overrides"


@pytest.mark.parametrize("args, words", [
    (["sample"], "Missing argument 'SOURCE'"),
    (["train", "digits-dit", "--bogus"], "No such option"),
    (["sample", "x", "--num", "0"], "'--num': 0 is not in the range x>=1"),
    (["sample", "x", "--batch-size", "0"], "'--batch-size'"),
    (["evaluate-fid", "--run", "x", "--steps", "0"], "'--steps'"),
    (["no-such-command"], "No such command 'no-such-command'"),
])
def test_usage_errors_are_one_line_exit_2(args, words):
    proc = invoke_ditk(*args)
    assert proc.returncode == 2 and proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and words in lines[0], proc.stderr
    assert "Usage:" not in proc.stderr and "--help`" in lines[0]


def test_evaluate_fid_takes_positional_overrides(tmp_path):
    proc = invoke_ditk("evaluate-fid", tmp_path, tmp_path, "sample.steps=3")
    assert proc.returncode == 2 and "KEY=VALUE overrides only apply with --run RUN" in proc.stderr
    proc = invoke_ditk("evaluate-fid", tmp_path, tmp_path, "--set", "sample.steps=3")  # the deprecated spelling
    assert proc.returncode == 2 and "KEY=VALUE overrides only apply with --run RUN" in proc.stderr


def test_presets_list_prints_descriptions():
    proc = invoke_ditk("presets", "list", check=True)
    line = next(l for l in proc.stdout.splitlines() if l.startswith("digits-dit "))
    assert "handwritten digits" in line
    names = invoke_ditk("presets", "list", "--names", check=True).stdout.split("\n")
    assert "digits-dit" in names and "dit-xl-2" in names and all(" " not in n for n in names)


def test_train_reports_a_bad_preset_or_train_key_before_importing_torch(tmp_path):
    code = ("import sys\nfrom ditk.cli import main\n"
            "for args in (['train', 'no-such-preset'], ['train', 'digits-dit', 'train.max_step=3'],\n"
            "             ['train', 'digits-dit', 'oops']):\n"
            "    try:\n        main(args)\n    except SystemExit as e:\n        assert e.code == 2\n"
            "assert 'torch' not in sys.modules, 'torch was imported'\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.count("error: ") == 3 and not (tmp_path / "runs").exists()
