"""Feature-extractor weights on machines without internet: found by path, checked by sha256, never fetched.

clean-fid would download the Inception TorchScript file into a hard-coded `/tmp` (and pytorch-fid's
weights into the torch hub cache) the first time it is used; a compute node has no internet, so the
download hangs or fails, and a half-written file in `/tmp` is silently reused. ditk instead reads each file
from one folder the user names (`--weights-dir` or DITK_WEIGHTS_DIR), checks its sha256, and tells the
user exactly which file to fetch, from where, when it is missing.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from ..errors import DitkError

WEIGHTS_DIR_ENV = "DITK_WEIGHTS_DIR"


@dataclass(frozen=True)
class WeightFile:
    filename: str
    url: str
    sha256: str
    what: str


# The file clean-fid's `clean` and `legacy_tensorflow` modes use: NVIDIA's TorchScript translation of the
# TF Inception graph `inception-2015-12-05` (the FID reference network). URL from cleanfid/downloads_helper.py;
# sha256 as published by k-diffusion and others who pin this file (95,607,719 bytes).
INCEPTION_TORCHSCRIPT = WeightFile(
    filename="inception-2015-12-05.pt",
    url="https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/inception-2015-12-05.pt",
    sha256="f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4",
    what="Inception (TorchScript, clean-fid clean/legacy_tensorflow)",
)

# The file clean-fid's `legacy_pytorch` mode uses (pytorch-fid's port of the same TF graph). The hub file
# name carries the first 8 hex digits of its sha256 (6726825d), which the full digest below extends.
INCEPTION_PYTORCH_FID = WeightFile(
    filename="pt_inception-2015-12-05-6726825d.pth",
    url="https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth",
    sha256="6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
    what="Inception (pytorch-fid port, clean-fid legacy_pytorch)",
)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def weights_dir(explicit: Optional[str | os.PathLike] = None) -> Optional[Path]:
    """The folder the user named: the argument, else $DITK_WEIGHTS_DIR, else None (never a default)."""
    value = explicit if explicit not in (None, "") else os.environ.get(WEIGHTS_DIR_ENV) or None
    return Path(value).expanduser() if value is not None else None


def locate(spec: WeightFile, directory: Optional[str | os.PathLike]) -> Path:
    """Path of `spec` inside the user's weights folder, verified; a one-line DitkError otherwise."""
    fetch = f"download {spec.url} (sha256 {spec.sha256}) on a machine with internet"
    folder = weights_dir(directory)
    if folder is None:
        raise DitkError(f"{spec.what} weights are needed but no weights folder was given: {fetch}, "
                        f"put {spec.filename} in a folder and pass --weights-dir DIR (or set {WEIGHTS_DIR_ENV})")
    path = folder / spec.filename
    if not path.is_file():
        raise DitkError(f"missing {spec.what} weights {path}: {fetch} into {folder}")
    return verify(path, spec.sha256, spec.what)


def verify(path: Path, expected: str, what: str) -> Path:
    actual = sha256_file(path)
    if actual != expected:
        raise DitkError(f"refusing {what} weights {path}: sha256 is {actual}, expected {expected} "
                        f"(a partial download or another file): replace it with the right file")
    return path


def load_shipped(net, path: Path, expected: str, what: str, recreate: str):
    """A network whose weights ship inside the package (the digits and photos extractors): present, checked by
    sha256, loaded. recreate: the command that trains the file again."""
    from safetensors.torch import load_file

    if not path.is_file():
        raise DitkError(f"the {what} weights {path} are missing from the installation: recreate them with `{recreate}`")
    verify(path, expected, what)
    net.load_state_dict(load_file(path))
    return net
