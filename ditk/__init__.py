"""ditk: the Diffusion-Transformer ToolKit.

Importing this package is cheap on purpose (no torch): the CLI prints help and serves shell completion
from it. The runtime lives in submodules that commands import when they run.
"""

import os as _os

__version__ = "0.1.0"

# `commands/` and `presets/` sit beside this package in a source checkout and are installed *inside* it
# (pyproject's package-dir). When Python imports ditk from the checkout itself (`python -m ditk` or
# `torchrun -m ditk` run in the repo root puts the checkout first on sys.path), let ditk.commands and
# ditk.presets resolve to those sibling folders, as they do in an installed wheel.
_checkout = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if not _os.path.isdir(_os.path.join(__path__[0], "commands")) and _os.path.isfile(
    _os.path.join(_checkout, "commands", "__init__.py")
):
    __path__.append(_checkout)
