"""ditk: the Diffusion-Transformer ToolKit.

Importing this package is cheap on purpose (no torch): the CLI prints help and serves shell completion
from it. The runtime lives in submodules that commands import when they run.
"""

__version__ = "0.1.0"
