"""`pip install .` ships every package of the runtime: a subpackage missing from pyproject's explicit list installs
nothing and fails only on a clean machine (the source checkout still imports it)."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_every_ditk_subpackage_is_listed_in_pyproject():
    text = (ROOT / "pyproject.toml").read_text()
    listed = set(re.findall(r'"([^"]+)"', re.search(r"^packages = \[(.*)\]$", text, re.M).group(1)))
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "ditk").rglob("__init__.py")}
    assert found - listed == set(), f"add {sorted(found - listed)} to pyproject.toml's packages"
    assert {"ditk.commands", "ditk.presets"} <= listed
