"""One logger per run: every record goes to ``metrics.jsonl`` and, when enabled, to Weights & Biases.

W&B must never stop or change a training run: every call into it is guarded, the first failure prints
one warning and turns W&B off for the rest of the run, and the JSONL file stays the source of truth.
"""
from __future__ import annotations

import json
import math
import secrets
import os
import sys
from pathlib import Path

WANDB_MODES = ("offline", "online", "disabled")


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

            id_file = self.out_dir / "wandb_run_id.txt"
            # Reuse the run id on --resume, so a resumed job continues the same W&B run.
            run_id = id_file.read_text().strip() if resume and id_file.exists() else secrets.token_hex(4)
            id_file.write_text(run_id + "\n")
            self.run = wandb.init(
                project=project, name=name, group=group or None, tags=list(tags) or None,
                config=config, job_type=job_type, dir=str(self.out_dir), mode=mode,
                id=run_id, resume="allow", reinit="create_new",
            )
        except Exception as e:  # no network, bad key, broken install: training goes on without W&B
            self._fail("init", e)

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
        print(f"warning: W&B {what} failed ({type(e).__name__}: {e}); continuing without W&B",
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
