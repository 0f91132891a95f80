"""advgkl sweep: run names, refusals, the SLURM submission script (with fake sbatch/srun), and a
2 methods x 2 seeds sweep killed mid-epoch and rerun, ending bitwise like uninterrupted training."""
from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
import time

import pytest
import torch
import yaml

from advgkl import sweep
from advgkl.checkpoint import load_checkpoint
from advgkl.cli import main

BASE = {"name": "tiny", "data": {"dataset": "fashion_mnist", "subset": 1024, "batch_size": 32, "val_size": 0},
        "model": {"name": "tiny_cnn"}, "attack": {"eps": 0.1, "steps": 2}, "optim": {"epochs": 2},
        "eval": {"version": "none", "n_examples": 16, "batch_size": 16, "honesty_checks": False},
        "logging": {"wandb": "disabled", "progress": False}, "runtime": {"threads": 1}}


@pytest.fixture
def recipes(tmp_path, fmnist_root):
    (tmp_path / "base.yaml").write_text(yaml.safe_dump({**BASE, "data": {**BASE["data"], "root": str(fmnist_root)}}))
    for method in ("pgd_at", "trades"):
        (tmp_path / f"{method}.yaml").write_text(yaml.safe_dump({"method": {"name": method}}))
    return tmp_path


def test_names_are_stable_and_readable(recipes, tmp_path, capsys):
    args = ["sweep", str(recipes / "base.yaml"), "optim.epochs=1", "--variants", str(recipes / "pgd_at.yaml"),
            str(recipes / "trades.yaml"), "--grid", "attack.steps=1,3", "eval.eps=0.1", "--seeds", "0", "2",
            "--out", str(tmp_path / "sw"), "--dry-run"]
    assert main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [
        f"{m}_steps-{k}_eps-0.1_s{s}" for s in (0, 2) for m in ("pgd_at", "trades") for k in (1, 3)]  # seeds outermost
    assert "optim.epochs=1 attack.steps=1 eval.eps=0.1 name=pgd_at_steps-1_eps-0.1_s0 runtime.seed=0" in lines[0]
    assert not (tmp_path / "sw").exists()  # a dry run writes nothing
    specs = sweep.plan([str(recipes / "base.yaml")], [], sweep.parse_grid(["attack.eps=0.1", "eval.eps=0.2"]),
                       [1], tmp_path)
    assert [s["name"] for s in specs] == ["base_attack-eps-0.1_eval-eps-0.2_s1"]  # a shared leaf: the whole key


@pytest.mark.parametrize("args, message", [
    (["--grid", "optim.lr"], "--grid 'optim.lr': expected dotted.key=value1,value2"),
    (["--grid", "optim.lr=0.1,"], "--grid 'optim.lr=0.1,': expected"),
    (["--grid", "optim.lr=1", "optim.lr=2"], "--grid optim.lr is given twice"),
    (["--grid", "optim.lr=x"], "optim.lr: expected float, got str 'x'"),
    (["--seeds", "1", "1"], "--seeds 1 1: give distinct seeds"),
    (["--parallel", "0"], "--parallel 0: must be at least 1"),
    (["--gpus-per-node", "3", "--tasks-per-node", "2", "--executor", "slurm"], "--gpus-per-node 3 must be a multiple"),
    (["--nodes", "2"], "--executor local runs on one machine"),
    (["--variants", "missing.yaml"], "recipe missing.yaml does not exist"),
    (["--variants", "LIST"], "a recipe must be a non-empty YAML mapping of sections"),
    (["--variants", "BROKEN"], "broken.yaml: not a valid recipe YAML"),
    (["--variants", "TWICE"], "recipe twice.yaml line 2: duplicate key 'method'"),
    (["--variants", "pgd_at.yaml", "sub/pgd_at.yaml"], "two files have the same name"),
    (["--grid", "logging.group=a b,a_b"], "two grid points get the same run name"),
    (["--out", "FILE"], "is a file, not a folder"),
    (["method.name=gkl_kd"], "run base_s0 (method gkl_kd) distils a teacher: pass --teacher"),
    (["method.name=gkl_kd", "--teacher", "nope.pt"], "--teacher nope.pt does not exist"),
])
def test_bad_input_is_one_line_and_creates_nothing(recipes, tmp_path, capsys, args, message, monkeypatch):
    (recipes / "list.yaml").write_text("- a\n- b\n")
    (recipes / "broken.yaml").write_text("a: [b\n")
    (recipes / "sub").mkdir()
    (recipes / "sub" / "pgd_at.yaml").write_text("method: {name: pgd_at}\n")
    (recipes / "file").write_text("")
    (recipes / "twice.yaml").write_text("method: {name: pgd_at}\nmethod: {name: trades}\n")
    monkeypatch.chdir(recipes)
    names = {"LIST": "list.yaml", "BROKEN": "broken.yaml", "FILE": "file", "TWICE": "twice.yaml"}
    args = [names.get(a, a) for a in args]
    out = tmp_path / "sw"
    assert main(["sweep", str(recipes / "base.yaml"), *args, *([] if "--out" in args else ["--out", str(out)])]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_overrides_alone_are_not_a_recipe(tmp_path, capsys):
    assert main(["sweep", "optim.epochs=1", "--out", str(tmp_path / "sw")]) == 2
    assert "the recipe is missing: give one or more YAML recipes" in capsys.readouterr().err
    assert not (tmp_path / "sw").exists()


def test_slurm_submission_script_requeues_and_runs_torchrun(recipes, tmp_path, monkeypatch, capsys):
    """No cluster: a fake sbatch keeps the script and answers a job id; the script is what SLURM would get."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "srun").write_text("#!/bin/sh\nexit 0\n")
    (bin_dir / "sbatch").write_text(f"#!/bin/sh\ncp \"$1\" {tmp_path}/sbatch_$$.sh\necho Submitted batch job 4242\n")
    for f in bin_dir.iterdir():
        f.chmod(f.stat().st_mode | stat.S_IEXEC)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    out = tmp_path / "sw"
    assert main(["sweep", str(recipes / "base.yaml"), "--variants", str(recipes / "pgd_at.yaml"),
                 str(recipes / "trades.yaml"), "--seeds", "0", "1", "--executor", "slurm", "--partition", "gpu",
                 "--time", "90", "--gpus-per-node", "4", "--parallel", "3", "--cpus-per-task", "8",
                 "--setup", "module load cuda", "--out", str(out)]) == 0
    [script] = [p.read_text() for p in tmp_path.glob("sbatch_*.sh")]
    for line in ["#SBATCH --partition=gpu", "#SBATCH --time=90", "#SBATCH --gpus-per-node=4",
                 "#SBATCH --ntasks-per-node=1", "#SBATCH --nodes=1", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --signal=USR2@120", "#SBATCH --requeue", "#SBATCH --open-mode=append",
                 "#SBATCH --array=0-3%3", "module load cuda"]:
        assert line in script.splitlines(), line
    assert "submitit.core._submit" in script
    runs = json.loads((out / "sweep.json").read_text())["runs"]
    assert {n: (r["state"], r["job_id"]) for n, r in runs.items()} == {
        "pgd_at_s0": ("submitted", "4242_0"), "trades_s0": ("submitted", "4242_1"),  # seeds outermost
        "pgd_at_s1": ("submitted", "4242_2"), "trades_s1": ("submitted", "4242_3")}
    res = sweep.Resources(gpus_per_node=4)
    assert sweep.launcher(res)[:3] == ["torchrun", "--standalone", "--nproc_per_node=4"]
    two = sweep.Resources(gpus_per_node=4, nodes=2, tasks_per_node=2)
    assert sweep.launcher(two, ["n1", "n2"], "7")[:6] == [
        "torchrun", "--nnodes=4", "--nproc_per_node=2", "--rdzv_backend=c10d", "--rdzv_endpoint=n1:29500",
        "--rdzv_id=7"]
    assert sweep.launcher(sweep.Resources())[1:] == ["-m", "advgkl"]
    gpus = sweep.make_executor("slurm", tmp_path / "logs", two, {}).parameters
    assert gpus["gpus_per_task"] == 2 and "gpus_per_node" not in gpus


def _final_weights(run):
    return load_checkpoint(run / "checkpoints" / "final.pt")["model"]


@pytest.mark.slow
def test_a_killed_sweep_reruns_to_the_uninterrupted_results(recipes, tmp_path):
    """Done-when of issue 18: SIGTERM to the sweep mid-epoch, rerun, every run bitwise as `advgkl train`."""
    out = tmp_path / "sw"
    cmd = [sys.executable, "-m", "advgkl", "sweep", str(recipes / "base.yaml"), "--variants",
           str(recipes / "pgd_at.yaml"), str(recipes / "trades.yaml"), "--seeds", "0", "1", "--parallel", "2",
           "--out", str(out)]
    driver = subprocess.Popen(cmd)
    first = out / "runs" / "pgd_at_s0"
    while not (first / "config.yaml").exists() and driver.poll() is None:  # the job has built its state
        time.sleep(0.01)
    driver.send_signal(signal.SIGTERM)
    assert driver.wait(timeout=120) == 75
    states = {n: r["state"] for n, r in json.loads((out / "sweep.json").read_text())["runs"].items()}
    assert states == {"pgd_at_s0": "preempted", "trades_s0": "preempted", "pgd_at_s1": "pending",
                      "trades_s1": "pending"}  # seeds outermost: the two seed-0 runs went first
    saved = load_checkpoint(first / "checkpoints" / "last.pt")
    assert 0 < saved["step"] < 64 and saved["loader"]["batch"] > 0  # stopped mid-epoch (32 steps an epoch)
    assert not (first / "results.json").exists()
    assert subprocess.run(cmd).returncode == 0
    manifest = json.loads((out / "sweep.json").read_text())["runs"]
    assert {n: (r["state"], r["attempts"]) for n, r in manifest.items()} == {
        "pgd_at_s0": ("done", 2), "trades_s0": ("done", 2), "pgd_at_s1": ("done", 1), "trades_s1": ("done", 1)}
    for name, entry in manifest.items():  # the uninterrupted reference: the same `advgkl train`, in one go
        ref = tmp_path / "ref" / name
        assert main(["train", str(out / "recipes" / f"{name[:-3]}.yaml"), *entry["overrides"], "--out", str(ref)]) == 0
        a, b = _final_weights(ref), _final_weights(out / "runs" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name
        ra, rb = (json.loads((d / "results.json").read_text()) for d in (ref, out / "runs" / name))
        assert ra["clean_acc"] == rb["clean_acc"] and ra["per_point"] == rb["per_point"]
    before = {p: p.stat().st_mtime_ns for p in out.rglob("results.json")}
    assert subprocess.run(cmd, capture_output=True, text=True).stdout.startswith(
        f"sweep {out}: 4 run(s), 4 finished, 0 to run")
    assert {p: p.stat().st_mtime_ns for p in out.rglob("results.json")} == before


class _Job:
    """A finished submitit job whose result is ``outcome`` (an exception: the job itself crashed)."""

    def __init__(self, outcome):
        self.outcome, self.job_id, self._process = outcome, "7", None
        self.paths = type("Paths", (), {"stdout": "log"})()

    def done(self):
        return True

    def result(self):
        if isinstance(self.outcome, Exception):
            raise self.outcome
        return self.outcome


class _Executor:
    def __init__(self, outcomes: dict):
        self.outcomes, self.submitted = outcomes, []

    def submit(self, fn, spec):
        self.submitted.append(spec["name"])
        return _Job(self.outcomes[spec["name"]].pop(0))


def test_local_requeue_limits_and_failures(tmp_path):
    preempted = {"status": "preempted", "signal": "SIGTERM", "returncode": 75}
    outcomes = {"a": [preempted, {"status": "done"}], "b": [preempted, preempted],
                "c": [RuntimeError("Traceback\nValueError: boom")],
                "d": [{"status": "failed", "returncode": 2, "command": "train r.yaml"}]}
    specs = [{"name": n, "dir": str(tmp_path / n), "overrides": []} for n in outcomes]
    manifest = sweep.Manifest(tmp_path, ["advgkl", "sweep"], specs, "local")
    ex = _Executor(outcomes)
    assert sweep._run_local(specs, ex, sweep.Resources(parallel=2), manifest, 1, 0.0) == 1
    assert ex.submitted == ["a", "b", "b", "a", "c", "d"]  # each preempted run goes back to the queue's head
    runs = json.loads((tmp_path / "sweep.json").read_text())["runs"]
    assert {n: (r["state"], r["attempts"], r["message"]) for n, r in runs.items()} == {
        "a": ("done", 2, None), "b": ("failed", 2, "preempted 2 times (--max-requeue 1)"),
        "c": ("failed", 1, "ValueError: boom"), "d": ("failed", 1, "train r.yaml exited with status 2")}


def test_the_job_passes_signals_on_and_reports_a_failed_step(tmp_path):
    job = sweep.RunJob(sweep.Resources(threads=1))
    job._child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    delayed = job.checkpoint({"name": "x"})  # submitit's time-limit hook: the child is told, then requeued
    assert job._child.returncode == -signal.SIGUSR1 and job._signal == "SIGUSR1"
    assert isinstance(delayed.function, sweep.RunJob) and delayed.args == ({"name": "x"},)
    spec = {"dir": str(tmp_path / "run"), "recipe": str(tmp_path / "missing.yaml"), "overrides": [],
            "aa_points": 0, "pgd20_full": False}
    assert sweep.RunJob(sweep.Resources())(spec) == {  # outside submitit too: a plain call
        "status": "failed", "returncode": 2, "command": f"train {tmp_path / 'missing.yaml'} --out {tmp_path / 'run'} "
                                                        "--resume"}
