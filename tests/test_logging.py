"""RunLogger: metrics.jsonl is strict JSON and the source of truth; a resume drops the records it redoes;
W&B failing at any call warns once, turns W&B off and never loses a JSONL record.

W&B itself is replaced by a stand-in run (the real service needs network or a minute-long offline setup);
tests/test_train.py runs the real offline mode end to end."""
import json

import numpy as np
import pytest
import torch

from advgkl.logging import RunLogger


def read_records(path) -> list[dict]:
    def refuse(token):  # json.loads accepts NaN/Infinity by default; strict readers do not
        raise ValueError(f"non-standard JSON token {token}")

    return [json.loads(line, parse_constant=refuse) for line in path.read_text().splitlines()]


def test_tensors_become_numbers_and_non_finite_values_strings(tmp_path):
    logger = RunLogger(tmp_path, mode="disabled")
    logger.log({"step": 3, "loss": torch.tensor(0.25), "acc": np.float64(0.5), "n": torch.tensor(7),
                "diverged": float("nan"), "grad_norm": torch.tensor(float("inf")), "low": -float("inf"),
                "method": "gkl_at", "ema": True}, step=3)
    assert read_records(tmp_path / "metrics.jsonl") == [
        {"step": 3, "loss": 0.25, "acc": 0.5, "n": 7, "diverged": "nan", "grad_norm": "inf", "low": "-inf",
         "method": "gkl_at", "ema": True}]
    # disabled: nothing of W&B is created
    assert logger.run is None and logger.wandb_dir is None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["metrics.jsonl"]


def test_resume_keeps_only_the_records_up_to_the_checkpoint_step(tmp_path):
    lines = ['{"epoch": 1, "step": 5, "train_loss": 2.0}',
             '{"epoch": 2, "step": 10, "train_loss": 1.5}',
             '{"epoch": 3, "step": 15, "train_loss": 1.2}',
             '{"eval/final/clean_acc": 0.8}',  # no step: written after the last epoch, redone by the resume
             '{"epoch": 4, "st']  # cut by the kill
    (tmp_path / "metrics.jsonl").write_text("\n".join(lines) + "\n")
    logger = RunLogger(tmp_path, mode="disabled", keep_until_step=10)
    assert (tmp_path / "metrics.jsonl").read_text() == lines[0] + "\n" + lines[1] + "\n"
    logger.log({"epoch": 3, "step": 15, "train_loss": 1.1}, step=15)  # the redone epoch follows
    assert [r["train_loss"] for r in read_records(tmp_path / "metrics.jsonl")] == [2.0, 1.5, 1.1]


def test_resume_without_a_metrics_file_starts_none(tmp_path):
    RunLogger(tmp_path, mode="disabled", keep_until_step=10)
    assert not (tmp_path / "metrics.jsonl").exists()


# ---------------------------------------------------------------- W&B, replaced by a stand-in run


class ServiceDown(RuntimeError):
    pass


class StandInRun:
    """Records what RunLogger sends; each method named in ``broken`` raises ServiceDown instead."""

    def __init__(self, broken=(), dir="/wandb/run-files"):
        self.broken = set(broken)
        self.logged, self.artifacts, self.finished = [], [], 0
        self._dir = dir
        run = self

        class Summary(dict):
            def __setitem__(self, key, value):
                run._maybe_fail("summary")
                super().__setitem__(key, value)

        self.summary = Summary()

    def _maybe_fail(self, what):
        if what in self.broken:
            raise ServiceDown(f"{what}: connection reset by peer")

    @property
    def dir(self):
        self._maybe_fail("dir")
        return self._dir

    def log(self, data, step=None):
        self._maybe_fail("log")
        self.logged.append((data, step))

    def log_artifact(self, artifact):
        self._maybe_fail("artifact")
        self.artifacts.append(artifact)

    def finish(self):
        self._maybe_fail("finish")
        self.finished += 1


@pytest.fixture
def wandb_stub(monkeypatch):
    """wandb.init returns the run given to ``set`` and records its keyword arguments."""
    import wandb

    monkeypatch.setenv("WANDB_SILENT", "true")  # RunLogger sets it when unset; keep the environment as it was
    calls = []

    class Stub:
        run = None

        def set(self, run):
            self.run = run

        def init(self, **kwargs):
            calls.append(kwargs)
            return self.run

    stub = Stub()
    stub.calls = calls
    monkeypatch.setattr(wandb, "init", stub.init)
    return stub


def test_wandb_gets_the_numeric_values_and_the_run_id_survives_a_resume(tmp_path, wandb_stub):
    run = StandInRun()
    wandb_stub.set(run)
    logger = RunLogger(tmp_path, mode="offline", project="p", name="n", group="", tags=("a",), config={"x": 1})
    logger.log({"step": 4, "loss": torch.tensor(0.5), "bad": float("nan"), "ema": True, "method": "mart"}, step=4)
    assert run.logged == [({"step": 4, "loss": 0.5}, 4)]  # W&B charts numbers; strings and flags stay in the JSONL
    logger.summary({"clean_acc": torch.tensor(0.75)})
    assert run.summary == {"clean_acc": 0.75}
    assert logger.wandb_dir == "/wandb/run-files"
    logger.finish()
    assert run.finished == 1

    first_id = (tmp_path / "wandb_run_id.txt").read_text().strip()
    assert wandb_stub.calls[0]["id"] == first_id and wandb_stub.calls[0]["group"] is None  # "" = no group
    RunLogger(tmp_path, mode="offline", resume=True)
    assert wandb_stub.calls[1]["id"] == first_id  # --resume continues the same W&B run
    RunLogger(tmp_path, mode="offline")
    assert wandb_stub.calls[2]["id"] != first_id  # a new run is a new W&B run


def test_wandb_init_failure_warns_once_and_the_run_logs_to_jsonl_only(tmp_path, monkeypatch, capsys):
    import wandb

    monkeypatch.setenv("WANDB_SILENT", "true")

    def no_network(**kwargs):
        raise wandb.errors.CommError("could not reach api.wandb.ai")

    monkeypatch.setattr(wandb, "init", no_network)
    logger = RunLogger(tmp_path, mode="online")
    assert capsys.readouterr().err == (
        "warning: W&B init failed (CommError: could not reach api.wandb.ai); continuing without W&B\n")
    assert logger.run is None
    logger.log({"step": 1, "loss": 1.0}, step=1)
    logger.summary({"clean_acc": 0.5})
    logger.save_artifact(tmp_path / "metrics.jsonl", name="m")
    logger.finish()
    assert capsys.readouterr().err == ""  # said once
    assert read_records(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}]


@pytest.mark.parametrize("what,call", [
    ("log", lambda logger, tmp: logger.log({"step": 2, "loss": 0.5}, step=2)),
    ("summary", lambda logger, tmp: logger.summary({"clean_acc": 0.5})),
    ("artifact", lambda logger, tmp: logger.save_artifact(tmp / "metrics.jsonl", name="metrics")),
    ("finish", lambda logger, tmp: logger.finish()),
])
def test_the_first_wandb_failure_warns_once_and_turns_wandb_off(tmp_path, wandb_stub, capsys, what, call):
    run = StandInRun()
    wandb_stub.set(run)
    logger = RunLogger(tmp_path, mode="online")
    logger.log({"step": 1, "loss": 1.0}, step=1)
    run.broken = {what}  # W&B worked until now
    call(logger, tmp_path)
    assert capsys.readouterr().err == (
        f"warning: W&B {what} failed (ServiceDown: {what}: connection reset by peer); continuing without W&B\n")
    assert logger.run is None
    logger.log({"step": 3, "loss": 0.25}, step=3)
    logger.summary({"clean_acc": 0.5})
    logger.save_artifact(tmp_path / "metrics.jsonl", name="metrics")
    logger.finish()
    assert capsys.readouterr().err == ""  # the failure is reported once, then W&B is off for good
    assert run.logged == [({"step": 1, "loss": 1.0}, 1)]  # nothing reached W&B after the failure
    assert run.artifacts == [] and run.finished == 0
    expected_steps = [1, 2, 3] if what == "log" else [1, 3]  # the failed log call still wrote its line
    assert [r["step"] for r in read_records(tmp_path / "metrics.jsonl")] == expected_steps  # JSONL lost nothing


def test_a_missing_artifact_file_is_a_wandb_failure_not_a_crash(tmp_path, wandb_stub, capsys):
    # the real wandb.Artifact refuses the path: the guard catches what wandb raises, whatever it is
    wandb_stub.set(StandInRun())
    logger = RunLogger(tmp_path, mode="online")
    logger.save_artifact(tmp_path / "results.json", name="results")
    err = capsys.readouterr().err
    assert err.startswith("warning: W&B artifact failed (") and err.endswith("; continuing without W&B\n")
    assert str(tmp_path / "results.json") in err and logger.run is None


def test_wandb_dir_is_none_when_the_run_cannot_say(tmp_path, wandb_stub, capsys):
    run = StandInRun(broken={"dir"})
    wandb_stub.set(run)
    logger = RunLogger(tmp_path, mode="online")
    assert logger.wandb_dir is None
    assert logger.run is run and capsys.readouterr().err == ""  # only a lookup: W&B stays on
    logger.log({"step": 1}, step=1)
    assert run.logged == [({"step": 1}, 1)]
