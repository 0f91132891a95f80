"""Atomic writes, safe loading, RNG state capture and run-folder locking.

Every file advgkl writes goes through a temporary file in the same folder, flush + fsync, then
``os.replace``: a kill at any moment leaves either the old file or the new one, never half of one.
Checkpoints are loaded with ``torch.load(weights_only=True)``, which cannot execute code; a file that
does not load is named with what it is (folder, empty, HTML page, not a torch file, truncated, or
holding objects outside weights_only's allowlist), never with torch's advice to drop weights_only.
"""
from __future__ import annotations

import fcntl
import hashlib
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


def file_sha256(path: str | Path) -> str:
    """Hex sha256 of a file, read in 4 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def write_json(path: str | Path, obj) -> None:
    _atomic_write(Path(path), (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Load an advgkl checkpoint safely; anything else (or a pickle with code) is a one-line ``UserError``."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"checkpoint {path} is a folder, not a checkpoint file{_inside_hint(path)}")
    if not path.is_file():
        raise UserError(f"checkpoint {path} does not exist")
    try:
        ckpt = safe_torch_load(path, map_location=map_location)
    except Exception as e:  # truncated zip, HTML page, pickle that wants to run code, ...
        kind, detail = why_unloadable(path, e)
        raise UserError(f"{path} {_DESCRIBE[kind].format(detail=detail, size=path.stat().st_size)}") from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != FORMAT:
        raise UserError(f"{path} is not an advgkl checkpoint (no '{FORMAT}' format tag)")
    return ckpt


def _inside_hint(folder: Path) -> str:
    """"; did you mean .../final.pt?" when ``folder`` is a run folder (or its checkpoints/) holding one."""
    for candidate in (folder / "checkpoints" / "final.pt", folder / "final.pt"):
        if candidate.is_file():
            return f"; did you mean {candidate}?"
    return ""


# What load_checkpoint says after the file name, for each kind ``why_unloadable`` returns. torch's own
# message is never repeated: it advises retrying with weights_only=False, which would run the file's code.
_DESCRIBE = {
    "empty": "is empty (0 bytes), not a checkpoint (an interrupted copy or download?)",
    "html": "is an HTML page, not a checkpoint (a failed download?)",
    "not-torch": "is not a torch checkpoint",
    "objects": "holds objects that are not plain tensors/containers ({detail}); advgkl only loads weights_only "
               "checkpoints",
    "legacy": "is an old-format torch checkpoint that weights_only loading cannot read; advgkl only loads "
              "weights_only checkpoints",
    "corrupt": "is not a loadable checkpoint: it is truncated or corrupt ({size} bytes; {detail})",
    "unreadable": "cannot be read ({detail})",
}

# a torch.save(..., _use_new_zipfile_serialization=False) file starts with this number pickled (any protocol)
_LEGACY_TORCH_MAGIC = b"\x8a\nl\xfc\x9cF\xf9 j\xa8P\x19"
_ZIP_MAGIC = b"PK\x03\x04"


def safe_torch_load(path: Path, map_location="cpu"):
    """``torch.load(weights_only=True)``, without torch's warning about a foreign pickle protocol (the
    error that follows, explained by ``why_unloadable``, says more)."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Detected pickle protocol", category=UserWarning)
        return torch.load(path, map_location=map_location, weights_only=True)


def looks_like_html(head: bytes) -> bool:
    """Whether the first bytes of a file are a web page (what a failed or blocked download saves)."""
    text = head.lstrip().lower()
    return text.startswith((b"<!doctype", b"<html", b"<?xml", b"<head", b"<body")) or b"<html" in text[:1024]


def why_unloadable(path: Path, err: BaseException) -> tuple[str, str]:
    """Why ``torch.load(path, weights_only=True)`` raised ``err``: (kind, detail).

    kind is one of "empty", "html", "not-torch" (neither torch format: random bytes, a plain pickle, a zip
    of something else), "objects" (a real torch file whose pickle refers to classes or functions outside
    weights_only's allowlist; detail names the first one), "legacy" (a pre-zip torch file written with a
    pickle protocol the weights_only unpickler does not read), "corrupt" (a torch file that ends early or is
    damaged; detail is torch's first sentence) or "unreadable" (the file cannot be opened and read; detail
    is the OSError's reason).
    """
    try:  # torch's own OSError (e.g. EINVAL on some truncated zips) does not mean the file is unreadable
        kind = sniff(path)
    except OSError as e:
        return "unreadable", e.strerror or type(e).__name__
    if kind != "torch":
        return kind, ""
    refused = _refused_global(str(err))
    if refused:
        return "objects", refused
    with open(path, "rb") as f:
        legacy = not f.read(4).startswith(_ZIP_MAGIC)
    if legacy and "Unsupported operand" in str(err):  # e.g. saved with pickle_protocol=4
        return "legacy", ""
    return "corrupt", _first_sentence(err)


def sniff(path: Path) -> str:
    """What a file is, from its first bytes only: "empty", "html", "not-torch" or "torch" (either of
    torch.save's formats; whether it loads is another matter). OSError propagates."""
    path = Path(path)
    with open(path, "rb") as f:
        head = f.read(4096)
    if not head:
        return "empty"
    if looks_like_html(head):
        return "html"
    if head.startswith(_ZIP_MAGIC):
        return "torch" if _zip_holds_a_pickle(path) else "not-torch"
    if head[:1] == b"\x80" and _LEGACY_TORCH_MAGIC in head[:32]:
        return "torch"
    return "not-torch"


def _zip_holds_a_pickle(path: Path) -> bool:
    """A torch zip checkpoint holds ``<name>/data.pkl``; a damaged zip counts as one (it may be a torch file)."""
    import zipfile

    try:
        with zipfile.ZipFile(path) as z:
            return any(n == "data.pkl" or n.endswith("/data.pkl") for n in z.namelist())
    except (zipfile.BadZipFile, OSError, EOFError):
        return True


def _refused_global(message: str) -> str:
    """The class or function weights_only refused (e.g. "posix.system"), from torch's message; "" if none."""
    import re

    m = re.search(r"GLOBAL ([\w.]+)", message)
    return m.group(1) if m else ""


def _first_sentence(err: BaseException) -> str:
    """torch's reason, first sentence only, without its advice about weights_only."""
    for line in str(err).splitlines():
        line = line.strip()
        if line and "weights_only" not in line:
            return line.split(". ")[0].rstrip(".")[:200]
    return type(err).__name__


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
    """An exclusive lock on a run folder, so two jobs never write the same outputs at once. Entering it
    creates the folder and checks that files can be written there; each failure is a one-line ``UserError``."""

    def __init__(self, out_dir: Path):
        self.path = Path(out_dir) / ".lock"
        self.fd = None

    def __enter__(self):
        folder = self.path.parent
        try:
            folder.mkdir(parents=True, exist_ok=True)
            self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"output folder {folder} is not writable ({e.strerror or e})") from None
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            raise UserError(f"{folder} is in use by another advgkl job (lock held on {self.path})") from None
        try:  # the lock file may predate a change of permissions: write a fresh file too
            probe = folder / ".write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as e:
            self.__exit__()
            raise UserError(f"output folder {folder} is not writable ({e.strerror or e})") from None
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)
