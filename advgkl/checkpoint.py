"""Atomic writes, safe loading, RNG state capture and run-folder locking.

Every file advgkl writes goes through a temporary file in the same folder, flush + fsync, then
``os.replace``: a kill at any moment leaves either the old file or the new one, never half of one.
Checkpoints are loaded with ``torch.load(weights_only=True)``, which cannot execute code.
"""
from __future__ import annotations

import fcntl
import io
import json
import os
import platform
import random
import subprocess
from pathlib import Path

import numpy as np
import torch

from .errors import UserError

FORMAT = "advgkl-checkpoint-v1"


def _atomic_write(path: Path, data: bytes) -> None:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:  # disk full, quota, read-only: the previous file is untouched
        tmp.unlink(missing_ok=True)
        kept = f"; the previous {path.name} is intact" if path.exists() else ""
        raise UserError(f"could not write {path} ({e.strerror or e}){kept}") from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    # fsync the folder so the rename itself survives a power cut.
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_torch_save(obj, path: str | Path) -> None:
    buf = io.BytesIO()
    torch.save(obj, buf)
    _atomic_write(Path(path), buf.getvalue())


def write_json(path: str | Path, obj) -> None:
    _atomic_write(Path(path), (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load an advgkl checkpoint safely; anything else (or a pickle with code) is a ``UserError``."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:  # truncated zip, HTML page, pickle that wants to run code, ...
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a loadable checkpoint (safe loading refused it: {first})") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not an advgkl checkpoint (no '{FORMAT}' format tag)")
    return ckpt


def rng_state() -> dict:
    """Every RNG the training loop touches, in types ``weights_only`` loading accepts."""
    np_state = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    name, keys, *rest = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _git_commit() -> str:
    try:
        here = Path(__file__).resolve().parent
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() if out.returncode == 0 else "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def environment_info() -> dict:
    from . import __version__

    info = {
        "advgkl": __version__,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "git_commit": _git_commit(),
        "device": torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor() or "cpu",
    }
    for mod in ("pyautoattack", "torchvision", "robustbench"):
        try:
            from importlib.metadata import version

            info[mod] = version(mod)
        except Exception:
            info[mod] = "not installed"
    return info


class RunLock:
    """An exclusive lock on a run folder, so two jobs never write the same outputs at once."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / ".lock"
        self.fd = None

    def __enter__(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise UserError(f"{self.path.parent} is in use by another advgkl job (lock held on {self.path})") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
