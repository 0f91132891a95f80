"""``advgkl sweep``: a grid of ``advgkl train`` runs over seeds, on this machine or a SLURM cluster.

``plan`` expands the recipes, the grid and the seeds into runs, each a folder ``OUT/runs/<name>`` with a
stable name (``<recipe>[_<key>-<value>...]_s<seed>``) and the ``advgkl train ... --out DIR --resume``
command it is; ``launch`` hands the unfinished ones to submitit (its local executor: ``--parallel`` runs
at once, each with its share of the CPU threads; its SLURM executor: a job array) and records every
run's state in ``OUT/sweep.json``. A finished run (its results.json and asked-for extras exist) is
skipped; an interrupted one resumes from its checkpoint. A job stopped by a preemption signal exits with
``preemption.PREEMPTED_EXIT`` and is requeued (docs/sweep.md).
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import yaml

from .errors import UserError
from .preemption import PREEMPTED_EXIT

SWEEP_FILE = "sweep.json"
EXECUTORS = ("local", "slurm")
ACTIVE_SLURM = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "UNKNOWN"}


@dataclasses.dataclass
class Resources:
    """What each job gets. ``threads``: CPU threads per run (local: the CPUs shared by ``parallel``);
    GPUs and tasks: a job with more than one GPU runs ``torchrun`` (one per task, ``gpus_per_node //
    tasks_per_node`` processes each)."""

    parallel: int = 1
    threads: int = 0  # 0: leave the thread count to torch (or to SLURM's --cpus-per-task)
    gpus_per_node: int = 0
    nodes: int = 1
    tasks_per_node: int = 1


# ------------------------------------------------------------------------------------------- plan
def read_recipe(path: str | Path) -> dict:
    """A recipe file as a dict; a missing, unreadable or non-mapping file is a UserError naming it."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"recipe {path} does not exist")
    from .config import _read_yaml

    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(f"recipe {path} cannot be read ({type(e).__name__})") from None
    raw = _read_yaml(text, str(path))  # as advgkl train reads it: safe YAML, no key twice
    if not isinstance(raw, dict) or not raw:
        raise UserError(f"recipe {path}: a recipe must be a non-empty YAML mapping of sections")
    return raw


def merge(base: dict, extra: dict) -> dict:
    """``extra`` over ``base``, section by section (a later recipe file changes only the keys it names)."""
    out = dict(base)
    for key, value in extra.items():
        out[key] = merge(out.get(key) or {}, value) if isinstance(value, dict) else value
    return out


def parse_grid(items: list[str]) -> list[tuple[str, list[str]]]:
    """``["method.beta=3,6", ...]`` -> ``[("method.beta", ["3", "6"]), ...]``, in the given order."""
    grid, seen = [], set()
    for item in items:
        key, sep, values = item.partition("=")
        vals = [v.strip() for v in values.split(",")]
        if not sep or not key.strip() or not all(vals):
            raise UserError(f"--grid {item!r}: expected dotted.key=value1,value2, e.g. method.beta=3,6")
        if key in seen:
            raise UserError(f"--grid {key} is given twice; list all its values in one --grid {key}=a,b")
        seen.add(key)
        grid.append((key.strip(), vals))
    return grid


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "-", text).strip("-") or "x"


def _suffix(grid_keys: list[str], key: str, value: str) -> str:
    """``_beta-3``: the key's last part (the whole dotted key when two grid keys share it) and the value."""
    leaf = key.rsplit(".", 1)[-1]
    label = leaf if sum(k.rsplit(".", 1)[-1] == leaf for k in grid_keys) == 1 else key.replace(".", "-")
    return f"_{_slug(label)}-{_slug(value)}"


def plan(recipes: list[str], overrides: list[str], grid: list[tuple[str, list[str]]], seeds: list[int],
         out: Path, *, variants: list[str] = (), teacher: str | None = None, aa_points: int = 0,
         pgd20_full: bool = False) -> list[dict]:
    """The sweep's runs as JSON-able specs, every config validated: nothing is written.

    ``recipes`` are merged in order; each of ``variants`` (more recipe files) is merged on top of them
    in turn and names its runs (its file stem), else the last recipe's stem does. ``teacher`` goes to
    the runs whose method distils one (``method.teacher``)."""
    from itertools import product

    from .config import apply_overrides, from_dict
    from .methods import get_method

    if not seeds or len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {' '.join(map(str, seeds))}: give distinct seeds, e.g. --seeds 0 1 2")
    base = {}
    for path in recipes:
        base = merge(base, read_recipe(path))
    stacks = [(Path(v).stem, merge(base, read_recipe(v))) for v in variants] or [(Path(recipes[-1]).stem, base)]
    if len({stem for stem, _ in stacks}) != len(stacks):
        raise UserError(f"--variants {' '.join(variants)}: two files have the same name; run names would clash")
    keys = [k for k, _ in grid]
    specs = []
    # seeds outermost: a sweep stopped part-way has compared every variant and grid point on its first seeds
    for seed, (stem, raw), values in product(seeds, stacks, product(*(vals for _, vals in grid))):
        point = [f"{k}={v}" for k, v in zip(keys, values)]
        name = stem + "".join(_suffix(keys, k, v) for k, v in zip(keys, values)) + f"_s{seed}"
        run_overrides = [*overrides, *point, f"name={name}", f"runtime.seed={seed}"]
        run_raw = apply_overrides(json.loads(json.dumps(raw)), list(run_overrides))
        method = (run_raw.get("method") or {}).get("name", "gkl_at")
        if get_method(method).needs_teacher and not run_raw["method"].get("teacher"):
            if teacher is None:
                raise UserError(f"run {name} (method {method}) distils a teacher: pass --teacher CHECKPOINT")
            if not Path(teacher).is_file():
                raise UserError(f"--teacher {teacher} does not exist")
            run_overrides.append(f"method.teacher={Path(teacher).resolve()}")
        from_dict(apply_overrides(json.loads(json.dumps(raw)), list(run_overrides)))  # a bad key or value: named now
        specs.append({"name": name, "dir": str((out / "runs" / name).resolve()), "seed": seed,
                      "recipe": str((out / "recipes" / f"{stem}.yaml").resolve()), "overrides": run_overrides,
                      "aa_points": aa_points, "pgd20_full": pgd20_full, "_raw": raw})
    if len({s["name"] for s in specs}) != len(specs):
        raise UserError("two grid points get the same run name; use values that differ after "
                        "replacing characters other than letters, digits, '.', '+' and '-'")
    return specs


def write_recipes(specs: list[dict]) -> None:
    """The merged recipe of each variant, the file its runs' ``advgkl train`` reads."""
    for spec in specs:
        path = Path(spec["recipe"])
        path.parent.mkdir(parents=True, exist_ok=True)
        text = yaml.safe_dump(spec.pop("_raw"), sort_keys=False)
        if not path.is_file() or path.read_text() != text:
            path.write_text(text)


# ------------------------------------------------------------------------------------------- a run
def _results(run: Path) -> dict | None:
    path = run / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def top_up_target(run: Path, n_points: int) -> Path | None:
    """``aa<N>/``, where standard AutoAttack on the first ``n_points`` is still to run: the training job's
    own evaluation used fewer points (a screening ("fast") or no-test ("none") run is never topped up)."""
    done = _results(run)
    if not n_points or done is None or done["n_examples"] >= n_points or done["autoattack_version"] in ("none", "fast"):
        return None
    target = run / f"aa{n_points}"
    return None if (target / "results.json").exists() else target


def needs_pgd20(run: Path, wanted: bool) -> bool:
    """Whether PGD-20 on the whole test set is still to run (never for a run that must not see the test set)."""
    done = _results(run)
    return (wanted and done is not None and done["autoattack_version"] != "none"
            and not (run / "pgd20_full.json").exists())


def finished(spec: dict) -> bool:
    run = Path(spec["dir"])
    return (_results(run) is not None and top_up_target(run, spec["aa_points"]) is None
            and not needs_pgd20(run, spec["pgd20_full"]))


def launcher(res: Resources, hosts: list[str] | None = None, job_id: str = "0") -> list[str]:
    """``python -m advgkl``, or ``torchrun ... -m advgkl`` for a job of more than one GPU."""
    per_task = max(1, res.gpus_per_node // res.tasks_per_node)
    agents = res.nodes * res.tasks_per_node
    if per_task * agents <= 1:
        return [sys.executable, "-m", "advgkl"]
    if agents == 1:
        return ["torchrun", "--standalone", f"--nproc_per_node={per_task}", "-m", "advgkl"]
    return ["torchrun", f"--nnodes={agents}", f"--nproc_per_node={per_task}", "--rdzv_backend=c10d",
            f"--rdzv_endpoint={(hosts or ['localhost'])[0]}:29500", f"--rdzv_id={job_id}", "-m", "advgkl"]


def steps(spec: dict, res: Resources, hosts=None, job_id: str = "0"):
    """The commands still to run for ``spec``, each decided when the one before has finished."""
    run, prefix = Path(spec["dir"]), launcher(res, hosts, job_id)
    if _results(run) is None:
        yield [*prefix, "train", spec["recipe"], *spec["overrides"], "--out", str(run), "--resume"]
    target = top_up_target(run, spec["aa_points"])
    if target is not None:
        yield [*prefix, "eval", str(run / "checkpoints" / "final.pt"), "--out", str(target), "--n-examples",
               str(spec["aa_points"]), "--version", "standard", "--wandb", "disabled", "--resume"]
    if needs_pgd20(run, spec["pgd20_full"]):
        yield [sys.executable, "-m", "advgkl.sweep", "pgd20-full", str(run)]


class RunJob:
    """The callable each submitit job runs: the run's ``steps`` as child processes. SIGUSR1 and SIGTERM
    (and submitit's own time-limit signal, through ``checkpoint``) are passed on to the child as SIGUSR1,
    so it saves its state; the job then reports ``preempted`` and the sweep requeues it."""

    def __init__(self, res: Resources):
        self.res = res
        self._child: subprocess.Popen | None = None
        self._signal: str | None = None

    def __call__(self, spec: dict) -> dict:
        hosts, job_id = None, "0"
        try:
            import submitit

            env = submitit.JobEnvironment()
            hosts, job_id = list(env.hostnames), str(env.job_id)
        except RuntimeError:  # not inside a submitit job (called directly)
            pass
        previous = {sig: signal.signal(sig, self._forward) for sig in (signal.SIGUSR1, signal.SIGTERM)}
        threads = {"OMP_NUM_THREADS": str(self.res.threads), "MKL_NUM_THREADS": str(self.res.threads)}
        child_env = {**os.environ, **(threads if self.res.threads else {})}  # 0: as the cluster sets it
        try:
            for argv in steps(spec, self.res, hosts, job_id):
                print("$ " + " ".join(argv), flush=True)
                self._child = subprocess.Popen(argv, env=child_env)
                while self._child.poll() is None:  # polled, not wait(): the signal handler may wait too
                    time.sleep(0.1)
                rc = self._child.returncode
                if self._signal or rc == PREEMPTED_EXIT:
                    return {"status": "preempted", "signal": self._signal, "returncode": rc}
                if rc:
                    return {"status": "failed", "returncode": rc, "command": " ".join(argv[argv.index("-m") + 2:])}
            return {"status": "done"}
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _forward(self, signum, frame=None) -> None:
        self._signal = self._signal or signal.Signals(signum).name
        if self._child is not None and self._child.poll() is None:
            self._child.send_signal(signal.SIGUSR1)

    def checkpoint(self, spec: dict):
        """submitit's time-limit / preemption hook: let the child save, then requeue this same job."""
        from submitit.helpers import DelayedSubmission

        self._forward(signal.SIGUSR1)
        deadline = time.time() + 90
        while self._child is not None and self._child.poll() is None and time.time() < deadline:
            time.sleep(0.2)
        return DelayedSubmission(RunJob(self.res), spec)


# ------------------------------------------------------------------------------------------- launch
class Manifest:
    """``OUT/sweep.json``: the command, and each run's state (pending, running, preempted, done, failed,
    submitted), attempts, job id and log; rewritten atomically on every change."""

    def __init__(self, out: Path, command: list[str], specs: list[dict], executor: str):
        self.path = out / SWEEP_FILE
        old = json.loads(self.path.read_text()).get("runs", {}) if self.path.is_file() else {}
        self.data = {"command": command, "executor": executor, "runs": {}}
        for spec in specs:
            prev = old.get(spec["name"], {})
            self.data["runs"][spec["name"]] = {"dir": spec["dir"], "overrides": spec["overrides"],
                                               "state": prev.get("state", "pending"),
                                               "attempts": prev.get("attempts", 0), "job_id": prev.get("job_id"),
                                               "log": prev.get("log"), "message": prev.get("message")}

    def run(self, name: str) -> dict:
        return self.data["runs"][name]

    def set(self, name: str, **fields) -> None:
        self.data["runs"][name].update(fields)
        self.save()

    def save(self) -> None:
        from .checkpoint import write_json

        write_json(self.path, self.data)


def make_executor(kind: str, folder: Path, res: Resources, slurm: dict):
    import submitit

    if kind == "local":
        ex = submitit.LocalExecutor(folder=folder)
        ex.update_parameters(timeout_min=60 * 24 * 365, gpus_per_node=res.gpus_per_node)  # no time limit here
        return ex
    ex = submitit.SlurmExecutor(folder=folder, max_num_timeout=slurm.get("max_requeue", 3))
    gpus = ({"gpus_per_node": res.gpus_per_node} if res.tasks_per_node == 1
            else {"gpus_per_task": res.gpus_per_node // res.tasks_per_node})
    ex.update_parameters(
        time=slurm.get("time", 60 * 24), nodes=res.nodes, ntasks_per_node=res.tasks_per_node,
        signal_delay_s=120, array_parallelism=res.parallel, **({"cpus_per_task": res.threads} if res.threads else {}),
        job_name=slurm.get("job_name", "advgkl"), setup=list(slurm.get("setup", [])),
        additional_parameters={"requeue": True},
        **({"partition": slurm["partition"]} if slurm.get("partition") else {}),
        **(gpus if res.gpus_per_node else {}))
    return ex


def launch(specs: list[dict], out: Path, *, executor: str = "local", res: Resources | None = None,
           slurm: dict | None = None, max_requeue: int = 3, command: list[str] = (), poll_s: float = 0.2) -> int:
    """Run every unfinished run of ``specs``; returns 0 when all are done, 1 when one failed, ``PREEMPTED_EXIT``
    when the sweep itself was stopped by a signal, or (SLURM) 0 once the jobs are submitted."""
    res, slurm = res or Resources(), slurm or {}
    out.mkdir(parents=True, exist_ok=True)
    write_recipes(specs)
    manifest = Manifest(out, list(command), specs, executor)
    todo = []
    for spec in specs:
        if finished(spec):
            manifest.run(spec["name"]).update(state="done", message=None)
        elif executor == "slurm" and _slurm_active(out, manifest.run(spec["name"])):
            print(f"{spec['name']}: job {manifest.run(spec['name'])['job_id']} is still queued or running")
        else:
            todo.append(spec)
    manifest.save()
    done = len(specs) - len(todo)
    print(f"sweep {out}: {len(specs)} run(s), {done} finished, {len(todo)} to run ({executor})", flush=True)
    ex = make_executor(executor, out / "logs", res, {**slurm, "max_requeue": max_requeue})
    if not todo:
        return 0
    if executor == "slurm":
        with ex.batch():
            jobs = [(spec, ex.submit(RunJob(res), spec)) for spec in todo]
        for spec, job in jobs:
            manifest.set(spec["name"], state="submitted", job_id=job.job_id, log=str(job.paths.stdout),
                         attempts=manifest.run(spec["name"])["attempts"] + 1)
            print(f"{spec['name']}: submitted as job {job.job_id}")
        return 0
    return _run_local(todo, ex, res, manifest, max_requeue, poll_s)


def _slurm_active(out: Path, entry: dict) -> bool:
    if not entry.get("job_id") or entry.get("state") != "submitted":
        return False
    import submitit

    return submitit.SlurmJob(out / "logs", entry["job_id"]).state.split()[0] in ACTIVE_SLURM


def _run_local(todo: list[dict], ex, res: Resources, manifest: Manifest, max_requeue: int, poll_s: float) -> int:
    """At most ``res.parallel`` jobs at a time; a preempted one goes back to the queue's head."""
    stop: list[str] = []
    previous = {sig: signal.signal(sig, lambda signum, frame: stop.append(signal.Signals(signum).name))
                for sig in (signal.SIGUSR1, signal.SIGTERM)}
    queue, active, failed = list(todo), {}, 0
    try:
        while queue or active:
            while queue and len(active) < res.parallel and not stop:
                spec = queue.pop(0)
                job = ex.submit(RunJob(res), spec)
                active[spec["name"]] = (spec, job)
                entry = manifest.run(spec["name"])
                manifest.set(spec["name"], state="running", job_id=job.job_id, log=str(job.paths.stdout),
                             attempts=entry["attempts"] + 1, message=None)
                print(f"{spec['name']}: started (job {job.job_id}, log {job.paths.stdout})", flush=True)
            if stop and active:  # pass the signal on: each job saves its state and stops
                for _, job in active.values():
                    if job._process is not None and job._process.poll() is None:
                        job._process.send_signal(signal.SIGTERM)
                stop = stop[:1] + ["forwarded"]
            time.sleep(poll_s)
            for name, (spec, job) in list(active.items()):
                if not job.done():
                    continue
                del active[name]
                result = _result(job)
                attempts = manifest.run(name)["attempts"]
                if result["status"] == "preempted" and not stop and attempts <= max_requeue:
                    manifest.set(name, state="preempted", message=f"requeued after {result.get('signal')}")
                    queue.insert(0, spec)
                    print(f"{name}: preempted, requeued", flush=True)
                elif result["status"] == "done" or result["status"] == "preempted" and stop:
                    manifest.set(name, state=result["status"], message=None)
                    print(f"{name}: {result['status']}", flush=True)
                else:
                    result.setdefault("message", f"preempted {attempts} times (--max-requeue {max_requeue})")
                    failed += 1
                    manifest.set(name, state="failed", message=result["message"])
                    print(f"{name}: FAILED: {result['message']} (log {job.paths.stdout})", flush=True)
            if stop and not active:
                break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stop:
        print(f"sweep stopped by {stop[0]}; rerun the same command to continue", flush=True)
        return PREEMPTED_EXIT
    return 1 if failed else 0


def _result(job) -> dict:
    try:
        result = job.result()
    except Exception as e:  # the job itself crashed (not the run): keep the last line of its error
        return {"status": "failed", "message": str(e).strip().splitlines()[-1][:300]}
    if result["status"] == "failed":
        result["message"] = f"{result['command']} exited with status {result['returncode']}"
    return result


# ------------------------------------------------------------------------------------------- extras
def pgd20_full(run: Path) -> Path:
    """``pgd20_full.json``: PGD-20 (CE, uniform start, step 2.5 eps / 20) accuracy of the run's final
    weights on the whole test set, overall and per class."""
    import torch

    from .checkpoint import load_checkpoint, write_json
    from .config import from_saved
    from .evaluate import clean_accuracy, load_test_points, model_from_checkpoint
    from .honesty import pgd_correct
    from .runtime import pick_memory_format

    ckpt_path = run / "checkpoints" / "final.pt"
    ckpt = load_checkpoint(ckpt_path)
    cfg = from_saved(ckpt["config"])
    if cfg.runtime.threads:
        torch.set_num_threads(cfg.runtime.threads)
    device = torch.device("cpu")
    model, weights = model_from_checkpoint(ckpt, cfg, ckpt_path)
    model = model.eval().to(memory_format=pick_memory_format(cfg, device))
    x, y = load_test_points(cfg, 0)
    t0 = time.time()
    torch.manual_seed(cfg.runtime.seed)
    clean = clean_accuracy(model, x, y, device)
    robust = pgd_correct(model, x, y, eps=cfg.attack.eps, norm=cfg.attack.norm, steps=20, device=device)
    classes = sorted(set(y.tolist()))
    target = run / "pgd20_full.json"
    write_json(target, {
        "attack": "PGD-20, CE, uniform random start, step 2.5 eps / 20", "eps": cfg.attack.eps, "weights": weights,
        "n_examples": len(x), "clean_acc": clean.float().mean().item(), "pgd20_acc": robust.float().mean().item(),
        "per_class_clean_acc": [clean[y == c].float().mean().item() for c in classes],
        "per_class_pgd20_acc": [robust[y == c].float().mean().item() for c in classes],
        "wall_time_s": time.time() - t0})
    print(f"{run.name}: PGD-20 on {len(x)} points {robust.float().mean().item():.4f} in {time.time() - t0:.0f}s",
          flush=True)
    return target


if __name__ == "__main__" and sys.argv[1:2] == ["pgd20-full"]:  # a sweep job's extra step
    pgd20_full(Path(sys.argv[2]))
