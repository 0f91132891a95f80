"""One logger per run: every record goes to ``metrics.jsonl`` and, when enabled, to Weights & Biases.

W&B must never stop or change a training run: every call into it is guarded, the first failure prints
one warning and turns W&B off for the rest of the run, and the JSONL file stays the source of truth.
``online`` waits at most ``ADVGKL_WANDB_INIT_TIMEOUT`` seconds (default 30) for the server; when it gets no
answer (no network, a bad key, a server down) the run logs to an offline W&B folder instead, to
``wandb sync`` later, and says so in one line.
"""
from __future__ import annotations

import json
import math
import secrets
import os
import sys
import tempfile
from pathlib import Path

WANDB_MODES = ("offline", "online", "disabled")
INIT_TIMEOUT_ENV = "ADVGKL_WANDB_INIT_TIMEOUT"
DEFAULT_INIT_TIMEOUT_S = 30.0


def _one_line(e: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line (W&B's errors span several), cut to ``limit`` characters."""
    text = " ".join(f"{type(e).__name__}: {e}".split())
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _writable(folder: Path) -> OSError | None:
    """None when ``folder`` can be created and written, else the error that says why not."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as e:
        return e
    return None


def _home_dirs_for_wandb(out_dir: Path) -> None:
    """W&B keeps wandb-core's logs, its cache and artifact staging under HOME (~/.cache, ~/.local/share).

    When HOME is read-only or missing, wandb-core prints its logs to the terminal and the first artifact
    fails; point the folders W&B cannot write (and only those, when the user set no variable for them) into
    ``<out>/wandb/home/``, and say so in one line. This changes the process environment.
    """
    import platformdirs

    cache = Path(os.environ.get("XDG_CACHE_HOME") or platformdirs.user_cache_dir()).expanduser()
    wanted = [("XDG_CACHE_HOME", cache / "wandb", "cache"),  # wandb-core's logs, and W&B's cache below it
              ("WANDB_CACHE_DIR", Path(platformdirs.user_cache_dir("wandb")), "wandb-cache"),
              ("WANDB_DATA_DIR", Path(platformdirs.user_data_dir("wandb")), "wandb-data")]
    moved, reason = [], None
    for var, default, sub in wanted:
        if var != "XDG_CACHE_HOME" and os.environ.get(var):
            continue  # the user chose this folder: W&B's own error will name it
        error = _writable(default)
        if error is None:
            continue
        os.environ[var] = str(out_dir / "wandb" / "home" / sub)
        moved.append(str(default))
        reason = reason or error
    if moved:
        print(f"note: W&B cannot write to {', '.join(dict.fromkeys(moved))} ({_one_line(reason)}); it keeps its "
              f"logs and caches in {out_dir / 'wandb' / 'home'} instead", file=sys.stderr)


def _online_failure(e: BaseException, timeout: float) -> str:
    """What a failed online ``wandb.init`` means, in words, for the one line that reports it."""
    if type(e).__name__ == "AuthenticationError":
        return "the server refused the API key"
    text = str(e).lower()
    if isinstance(e, TimeoutError) or any(w in text for w in ("deadline exceeded", "timed out", "timeout")):
        return f"cannot reach the server in {timeout:g} s"
    return "online start failed"


def init_timeout() -> float:
    """Seconds ``wandb.init`` may wait for the server in online mode: $ADVGKL_WANDB_INIT_TIMEOUT or 30."""
    raw = os.environ.get(INIT_TIMEOUT_ENV)
    if raw is None or not raw.strip():
        return DEFAULT_INIT_TIMEOUT_S
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if math.isfinite(value) and value > 0:
        return value
    print(f"warning: {INIT_TIMEOUT_ENV}={raw!r} is not a positive number of seconds; using "
          f"{DEFAULT_INIT_TIMEOUT_S:g}", file=sys.stderr)
    return DEFAULT_INIT_TIMEOUT_S


def _jsonable(v):
    if hasattr(v, "item") and callable(v.item):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return str(v)
    return v


class RunLogger:
    """``log(dict, step)`` appends one JSON line and mirrors it to W&B (mode offline|online|disabled)."""

    def __init__(self, out_dir, *, mode="offline", project="advgkl", name=None, group=None, tags=(),
                 config=None, job_type="train", resume=False, keep_until_step=None):
        self.out_dir = Path(out_dir)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.out_dir / "metrics.jsonl"
        if keep_until_step is not None:
            self._truncate(keep_until_step)
        self.run = None
        if mode == "disabled":
            return
        try:
            os.environ.setdefault("WANDB_SILENT", "true")
            import wandb

            _home_dirs_for_wandb(self.out_dir)

            id_file = self.out_dir / "wandb_run_id.txt"
            # Reuse the run id on --resume, so a resumed job continues the same W&B run.
            run_id = id_file.read_text().strip() if resume and id_file.exists() else secrets.token_hex(4)
            id_file.write_text(run_id + "\n")
            kw = dict(project=project, name=name, group=group or None, tags=list(tags) or None, config=config,
                      job_type=job_type, dir=str(self.out_dir), id=run_id, resume="allow", reinit="create_new")
        except Exception as e:  # a broken install, an unwritable id file: training goes on without W&B
            self._fail("init", e)
            return
        if mode == "online":
            self._init_online(wandb, kw)
            return
        try:
            self.run = wandb.init(mode=mode, **kw)
        except Exception as e:
            self._fail("init", e)

    def _init_online(self, wandb, kw: dict) -> None:
        """Online with a bounded wait; no answer in time (no network, bad key) means offline, said in one line.

        The offline run keeps the run id, so ``wandb sync`` later uploads it as the run it was meant to be.
        """
        timeout = init_timeout()
        try:
            self.run = wandb.init(mode="online", settings=wandb.Settings(init_timeout=timeout), **kw)
            return
        except Exception as e:
            online_error = e
        try:
            # wandb-core still holds the failed run's id ("run ID ... is in use"): restart it, then go offline.
            # teardown also finishes any other W&B run of this process; advgkl keeps one open at a time.
            wandb.teardown()
            self.run = wandb.init(mode="offline", **kw)
            folder = Path(self.run.dir).parent  # <out>/wandb/offline-run-<time>-<id>, the one to sync
        except Exception as e:
            also = f"; offline logging failed too ({_one_line(e)})" if _one_line(e) != _one_line(online_error) else ""
            print(f"warning: W&B init failed ({_one_line(online_error)}){also}; continuing without W&B",
                  file=sys.stderr)
            self.run = None
            return
        print(f"W&B: {_online_failure(online_error, timeout)} ({_one_line(online_error)}); logging offline to "
              f"{folder} instead (wandb sync {folder} later)", file=sys.stderr)

    def _truncate(self, step: int) -> None:
        """On resume, drop the records written after the checkpoint we resume from: they get redone."""
        if not self.metrics_path.exists():
            return
        keep = []
        for line in self.metrics_path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # a line cut by a kill
                continue
            if isinstance(record.get("step"), int) and record["step"] <= step:
                keep.append(line + "\n")
        self.metrics_path.write_text("".join(keep))

    def _fail(self, what: str, e: Exception) -> None:
        print(f"warning: W&B {what} failed ({_one_line(e)}); continuing without W&B",
              file=sys.stderr)
        self.run = None

    def log(self, record: dict, step: int | None = None) -> None:
        clean = {k: _jsonable(v) for k, v in record.items()}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps(clean) + "\n")
        if self.run is not None:
            try:
                numeric = {k: v for k, v in clean.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
                self.run.log(numeric, step=step)
            except Exception as e:
                self._fail("log", e)

    def summary(self, values: dict) -> None:
        if self.run is not None:
            try:
                for k, v in values.items():
                    self.run.summary[k] = _jsonable(v)
            except Exception as e:
                self._fail("summary", e)

    def save_artifact(self, path, name: str, type: str = "results") -> None:
        if self.run is not None:
            try:
                import wandb

                art = wandb.Artifact(name=name, type=type)
                art.add_file(str(path))
                self.run.log_artifact(art)
            except Exception as e:
                self._fail("artifact", e)

    @property
    def wandb_dir(self) -> str | None:
        try:
            return self.run.dir if self.run is not None else None
        except Exception:
            return None

    def finish(self) -> None:
        if self.run is not None:
            try:
                self.run.finish()
            except Exception as e:
                self._fail("finish", e)
