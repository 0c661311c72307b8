"""The run directory: what one `ditk train` writes and what every later command reads.

runs/<name>/
  config.yaml                 fully resolved config (enough to re-create the run)
  lineage.json                command line, ditk version, parent run
  metrics.jsonl               one JSON object per logged step
  checkpoints/step-NNNNNN/    model.safetensors, ema.safetensors, state.pt, manifest.json (written last);
                              train.distributed=fsdp runs add sharded/ (model, EMA, optimizer shards: ditk/fsdp.py)
  checkpoints/latest          text file naming the newest complete checkpoint (a hint, see below)
  samples/                    grids written during training
  .lock                       who holds the run (flock; released by the OS when the holder dies)

Checkpoints are written into a temporary folder, fsynced and renamed, and `latest` is replaced
atomically, so a job killed at any moment leaves the previous checkpoint intact. Each checkpoint's
manifest.json lists the size and checksum (xxh3-128) of its files and is written last: a checkpoint is complete only
when its manifest verifies. `latest` is a hint: when it is missing or names a damaged checkpoint, readers
(`RunDir.latest_checkpoint`, `resolve_checkpoint`) take the newest checkpoint that verifies and say so on
stderr; when none verifies they stop with one line. `state.pt` holds only tensors and plain Python values
and is read with `weights_only=True`: loading never runs pickled code.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import shutil
import signal
import socket
import sys
import time
from pathlib import Path
from typing import Optional

import torch
from safetensors.torch import load_file, save_file

from . import __version__
from .atomic import atomic_dir, atomic_path, clean_temp, write_text
from .errors import ConfigError, DitkError, refused_global

CHECKPOINT_PREFIX = "step-"
CHECKPOINT_RE = re.compile(r"step-\d+")
MANIFEST = "manifest.json"
LOCK_FILE = ".lock"


def log(msg: str) -> None:
    print(f"[ditk] {msg}", file=sys.stderr, flush=True)


def checkpoint_name(step: int) -> str:
    return f"{CHECKPOINT_PREFIX}{step:06d}"


def is_main_rank() -> bool:
    """Rank 0 of a torchrun/accelerate launch (or a plain process). It holds the run's lock for the group."""
    return int(os.environ.get("RANK", "0")) == 0


class RunDir:
    def __init__(self, path: str | Path):
        self.path = Path(path)

    config = property(lambda self: self.path / "config.yaml")
    metrics = property(lambda self: self.path / "metrics.jsonl")
    checkpoints = property(lambda self: self.path / "checkpoints")
    samples = property(lambda self: self.path / "samples")

    # ---- ownership -------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def lock(self, what: str = "ditk train"):
        """Own the run directory while the block runs: an exclusive flock on <run>/.lock, which the OS releases
        when the holder exits or is killed (a stale lock never blocks). A second holder gets a one-line
        DitkError (exit 2) naming the holder's PID and host. Under torchrun only rank 0 takes it, for the
        whole group (the other ranks write nothing that rank 0 does not). On entry, the temporary leftovers
        of writes a killed holder interrupted are removed."""
        if not is_main_rank():
            yield self
            return
        import fcntl

        self.path.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 512, 0).decode("utf-8", "replace").strip() or "another process"
            os.close(fd)
            raise DitkError(f"run directory {self.path} is in use by {holder}: wait for it to finish or stop it, "
                            f"or set run.name=<new name> for another run") from None
        try:
            info = f"{what} (PID {os.getpid()} on host {socket.gethostname()}, since {time.strftime('%Y-%m-%d %H:%M:%S')})"
            os.ftruncate(fd, 0)
            os.pwrite(fd, info.encode() + b"\n", 0)
            for folder in (self.path, self.checkpoints, self.samples):
                clean_temp(folder, log)
            yield self
        finally:
            os.close(fd)  # releases the flock

    # ---- checkpoints -----------------------------------------------------------------------------------------
    def list_checkpoints(self) -> list[Path]:
        if not self.checkpoints.is_dir():
            return []
        return sorted(p for p in self.checkpoints.iterdir() if CHECKPOINT_RE.fullmatch(p.name) and p.is_dir())

    def latest_checkpoint(self, say: bool = True, files: Optional[tuple] = None) -> Optional[Path]:
        """The checkpoint to resume or sample from: the one `latest` names if it verifies, else the newest one
        that verifies (said on stderr unless say=False). None when the run has no checkpoint; a DitkError when
        it has checkpoints but none verifies (never a silent fresh start over existing checkpoints).
        `files`: verify only the files the caller reads (e.g. ("ema.safetensors",) to sample)."""
        found = self.list_checkpoints()
        pointer = self.checkpoints / "latest"
        named = None
        if pointer.is_file():
            try:
                named = pointer.read_text(errors="replace").strip()
            except OSError:
                named = ""
        note = None
        if named is not None and CHECKPOINT_RE.fullmatch(named) and (self.checkpoints / named).is_dir():
            problem = verify_checkpoint(self.checkpoints / named, files)
            if problem is None:
                return self.checkpoints / named
            note = f"checkpoints/latest names {named}, which is damaged ({problem})"
        elif named is not None and CHECKPOINT_RE.fullmatch(named):
            note = f"checkpoints/latest names {named}, which does not exist"
        elif named is not None:
            shown = named if len(named) < 40 and named.isprintable() else "something unreadable"
            note = f"checkpoints/latest names {shown or 'nothing'}, which is not a checkpoint of this run"
        elif found:
            note = "checkpoints/latest is missing"
        problems = []
        for ckpt in reversed(found):
            if ckpt.name == named:
                continue
            problem = verify_checkpoint(ckpt, files)
            if problem is None:
                if say:
                    log(f"{note}: using {ckpt.name}, the newest checkpoint that verifies")
                return ckpt
            problems.append(f"{ckpt.name}: {problem}")
        if note and found:
            raise DitkError(f"run {self.path} has {len(found)} checkpoint(s) but none verifies ({note}"
                            f"{'; ' + problems[0] if problems else ''}): restore them from a backup, or set "
                            f"run.name=<new name> to start a new run")
        if note and say:
            log(f"{note} and the run has no checkpoint folder")
        return None

    # ---- metrics ---------------------------------------------------------------------------------------------
    def read_metrics(self) -> list[dict]:
        """The records of metrics.jsonl. A torn (half-written) last line, e.g. from a full disk or a kill in
        the middle of a write, is dropped with a note on stderr, as is any other line that is not JSON."""
        if not self.metrics.is_file():
            return []
        records = []
        lines = self.metrics.read_bytes().decode("utf-8", "replace").split("\n")
        for i, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("step"), int):
                    raise ValueError("no step")
            except ValueError:
                where = "its last line" if i >= len(lines) - 1 else f"line {i}"
                log(f"{self.metrics}: dropping {where}, which is not a complete record (a write was interrupted)")
                continue
            records.append(record)
        return records

    def truncate_metrics(self, step: int) -> None:
        """Keep only the records of steps <= `step` (a run killed after its last checkpoint logged further), so
        a resumed run's metrics.jsonl equals the uninterrupted run's."""
        if not self.metrics.is_file():
            return
        kept = [r for r in self.read_metrics() if r["step"] <= step]
        text = "".join(json.dumps(r) + "\n" for r in kept)
        if text.encode() != self.metrics.read_bytes():
            write_text(self.metrics, text)

    def append_metrics(self, record: dict) -> None:
        with open(self.metrics, "a") as f:
            f.write(json.dumps(record) + "\n")

    def write_lineage(self, parent: Optional[str] = None) -> None:
        info = {"command": sys.argv, "ditk_version": __version__, "parent": parent, "torch": torch.__version__}
        write_text(self.path / "lineage.json", json.dumps(info, indent=2) + "\n")


# ---- checkpoint files ----------------------------------------------------------------------------------------
def _contiguous(state_dict: dict) -> dict:
    return {k: v.detach().contiguous().cpu() for k, v in state_dict.items()}


# xxh3-128 reads at memory speed (~3 GB/s on one busy core, 10x sha256 here): verifying a DiT-XL/2 checkpoint
# (~11 GB with Adam's state) costs seconds. It detects damage, not tampering (state.pt is loaded safely anyway).
CHECKSUM = "xxh3_128"


def _checksum(path: Path, algorithm: str = CHECKSUM) -> str:
    if algorithm == "xxh3_128":
        import xxhash

        h = xxhash.xxh3_128()
    else:
        h = hashlib.new(algorithm)
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
    return h.hexdigest()


def write_manifest(folder: Path, step: int) -> None:
    """manifest.json: size and checksum of every file in the checkpoint folder, sub-folders included (an FSDP
    run's sharded/ state), by relative path. Written last."""
    files = {p.relative_to(folder).as_posix(): {"size": p.stat().st_size, "checksum": _checksum(p)}
             for p in sorted(folder.rglob("*")) if p.is_file() and p.relative_to(folder).as_posix() != MANIFEST}
    (folder / MANIFEST).write_text(json.dumps({"step": step, "algorithm": CHECKSUM, "files": files}, indent=1) + "\n")


_VERIFIED: dict = {}  # (folder, (name, size, mtime) ...) -> problem or None: one process hashes a checkpoint once


def verify_checkpoint(ckpt: Path, files: Optional[tuple] = None) -> Optional[str]:
    """None when the checkpoint is complete (every file of its manifest present with its size and checksum),
    else what is wrong, in a few words. `files`: check only these (a sampler needs only its weights file;
    the manifest must still be whole and list them). A checkpoint written before manifests existed (no
    manifest.json, but model/ema/state present) is accepted as it is."""
    ckpt = Path(ckpt)
    try:
        listing = tuple(sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in ckpt.iterdir()))
    except OSError as e:
        return f"unreadable folder ({type(e).__name__})"
    key = (str(ckpt.resolve()), listing, files)
    if key in _VERIFIED:
        return _VERIFIED[key]
    _VERIFIED[key] = problem = _verify(ckpt, files)
    return problem


def _verify(ckpt: Path, files: Optional[tuple]) -> Optional[str]:
    manifest = ckpt / MANIFEST
    needed = files or ("model.safetensors", "ema.safetensors", "state.pt")
    if not manifest.is_file():
        missing = [n for n in needed if not (ckpt / n).is_file()]
        return f"{MANIFEST} and {', '.join(missing)} are missing" if missing else None
    try:
        info = json.loads(manifest.read_text())
        algorithm = str(info.get("algorithm", "sha256"))
        items = [(str(name), int(entry["size"]), str(entry.get("checksum", entry.get("sha256"))))
                 for name, entry in info["files"].items()]
    except (ValueError, KeyError, TypeError, AttributeError, OSError):
        return f"{MANIFEST} is damaged"
    listed = {name for name, _, _ in items}
    if files and not set(files) <= listed:
        return f"{MANIFEST} does not list {', '.join(sorted(set(files) - listed))}"
    for name, size, digest in items:
        if files and name not in files:
            continue
        path = ckpt / name
        if not path.is_file():
            return f"{name} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{name} has {actual} bytes, its manifest says {size}: truncated or overwritten"
        if _checksum(path, algorithm) != digest:
            return f"{name} does not match its checksum: damaged"
    return None


def _kill_point(point: str, step: int) -> None:
    """Test aid: DITK_TEST_KILL=<point>@<step> makes the process SIGKILL itself at that point of writing the
    checkpoint of that step (points: model, state, manifest, renamed, latest), exactly as `kill -9` would.
    The fault-injection tests use it to stop inside a checkpoint write deterministically."""
    if os.environ.get("DITK_TEST_KILL") == f"{point}@{step}":
        os.kill(os.getpid(), signal.SIGKILL)


def save_checkpoint(run: RunDir, step: int, model_sd: dict, ema_sd: dict, state: dict, keep_last: int = 0,
                    files: Optional[dict] = None, folders: Optional[dict] = None) -> Path:
    """Write checkpoints/step-NNNNNN atomically (files, then the manifest last, fsync, rename), then point
    `latest` at it, then prune old ones. `files`: extra small files {name: text} to keep in the checkpoint
    (the loop stores a copy of config.yaml as run-config.yaml); `folders`: {name: folder already written
    beside it} moved into the checkpoint (an FSDP run's sharded state); the manifest covers them too."""
    target = run.checkpoints / checkpoint_name(step)
    with atomic_dir(target) as tmp:
        save_file(_contiguous(model_sd), str(tmp / "model.safetensors"))
        _kill_point("model", step)
        save_file(_contiguous(ema_sd), str(tmp / "ema.safetensors"))
        torch.save(state, tmp / "state.pt")
        for name, text in (files or {}).items():
            (tmp / name).write_text(text)
        for name, folder in (folders or {}).items():
            os.replace(folder, tmp / name)
        _kill_point("state", step)
        write_manifest(tmp, step)
        _kill_point("manifest", step)
    _kill_point("renamed", step)
    write_text(run.checkpoints / "latest", target.name + "\n")
    _kill_point("latest", step)
    if keep_last > 0:
        for old in run.list_checkpoints()[:-keep_last]:
            shutil.rmtree(old, ignore_errors=True)
    return target


def torch_load(path: Path, what: str = "file") -> object:
    """torch.load(weights_only=True) whose failures are one line naming the file (and the refused global)."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} is missing: the checkpoint is incomplete, pick another step") from None
    except Exception as e:  # a refused pickled global, a truncated zip, ...
        refused = refused_global(e)
        if refused:
            raise ConfigError(f"{path} contains a pickled {refused}, which ditk refuses to load (unpickling it could "
                              f"run code): use a checkpoint written by ditk") from None
        raise ConfigError(f"{what} {path} is damaged ({type(e).__name__}): pick another checkpoint "
                          f"(checkpoints/step-NNNNNN)") from None


def load_state(ckpt: Path) -> dict:
    return torch_load(Path(ckpt) / "state.pt", "checkpoint state")


def load_weights(ckpt: Path, which: str = "ema") -> dict:
    path = Path(ckpt) / f"{which}.safetensors"
    if not path.is_file():
        raise ConfigError(f"checkpoint file {path} is missing: the checkpoint is incomplete, pick another step")
    try:
        return load_file(str(path))
    except Exception as e:  # safetensors_rust.SafetensorError on a truncated or garbled header
        raise ConfigError(f"checkpoint file {path} is damaged ({type(e).__name__}): pick another checkpoint") from None


def is_checkpoint_dir(path: Path) -> bool:
    return (path / "state.pt").is_file() or (path / MANIFEST).is_file()


def resolve_checkpoint(source: str | Path, files: Optional[tuple] = None) -> tuple[Path, Path]:
    """A run dir or a checkpoint dir -> (run dir, checkpoint dir). A run's checkpoint is chosen by
    RunDir.latest_checkpoint (verified, with fallback); a checkpoint named explicitly must verify.
    `files`: the files the caller will read (only those are checked), default all."""
    source = Path(source)
    if (source / "config.yaml").is_file():
        ckpt = RunDir(source).latest_checkpoint(files=files)
        if ckpt is None:
            raise ConfigError(f"run '{source}' has no complete checkpoint yet: train it first (ditk train ...)")
        return source, ckpt
    if is_checkpoint_dir(source) and (source.parent.parent / "config.yaml").is_file():
        problem = verify_checkpoint(source, files)
        if problem is not None:
            raise ConfigError(f"checkpoint {source} is damaged ({problem}): pick another step, or pass the run "
                              f"directory to use its newest complete checkpoint")
        return source.parent.parent, source
    raise ConfigError(f"'{source}' is neither a ditk run directory nor one of its checkpoints/step-NNNNNN folders")


def save_json(path: Path, obj) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
