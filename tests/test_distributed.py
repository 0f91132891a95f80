"""torchrun/DDP training and sharded AutoAttack, on CPU with gloo and 2 processes spawned by the tests.

A spawned process joins a gloo group on a free port (what torchrun does) and calls the real
``trainers.train`` or ``attacks.AutoAttack`` (its chunks shared out over the ranks); results come back through a report folder
next to the run folders, never inside them. The last tests launch the real CLI under torchrun.
"""
from __future__ import annotations

import copy
import datetime
import faulthandler
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from advgkl import attacks, cli, distributed, evaluate, trainers
from advgkl.attacks import AutoAttack
from advgkl.checkpoint import FORMAT, atomic_torch_save, load_checkpoint
from advgkl.data import BatchLoader
from advgkl.errors import UserError
from conftest import tiny_recipe
from advgkl.models import create_model, register_model

# 2 ranks vs 1 rank, max |weight difference| after 8 SGD steps (weights are ~0.1-0.5). Not bitwise:
# DDP averages two half-batch gradient means instead of taking one full-batch mean (another float
# summation order), and a conv over 16 images rounds differently from one over 32. Measured on
# x86-64 CPU: 6e-8 for PGD-AT, MART, GKL-AT and GKL-AT + AWP + EMA; 1.4e-6 for TRADES, whose KL attack
# objective has tiny input gradients near the start, so rounding flips the sign of a few PGD pixel
# steps. On an Intel Xeon with AVX-512 (oneDNN picks other convolution kernels for batch 16 and 32) the
# same test measured 1.8e-5 for PGD-AT, 3.5e-6 for GKL-AT + AWP + EMA, 1.4e-6 for GKL-AT and under 1e-7
# for TRADES and MART. 1e-4 leaves ~5x room above the worst of both CPUs.
WEIGHT_ATOL = 1e-4
SPAWN_FAILED = (mp.ProcessRaisedException, mp.ProcessExitedException)


def cfg_for(root, *overrides):
    """tiny_cnn (no BatchNorm) on 256 real Fashion-MNIST images, global batch 32: 8 steps, seconds per run."""
    return tiny_recipe(root, *overrides, name="ddp", method={"name": "gkl_at"}, runtime={"deterministic": True},
                       optim={"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4})


# --------------------------------------------------------------------------------- process plumbing
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(job, *args, nprocs: int = 2) -> None:
    """``job(rank, *args)`` in ``nprocs`` fresh processes in one gloo group; raises when any rank fails
    (torch then terminates the others: a failed rank never leaves the test hanging)."""
    mp.spawn(_entry, args=(nprocs, free_port(), job, args), nprocs=nprocs, join=True)


def _entry(rank, size, port, job, args):
    faulthandler.enable()  # a crash in C++ (gloo) prints the Python stack of every thread
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(size), LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size,
                            timeout=datetime.timedelta(seconds=120))
    job(rank, *args)
    dist.barrier()  # no gloo work still in flight on either rank
    dist.destroy_process_group()
    _save_coverage()
    # Skip interpreter finalization: there gloo's worker threads can still drop tensors that need the GIL
    # and abort the process ("terminate called without an active exception", SIGABRT) after the job has
    # finished and written everything (seen twice in fresh-clone CI runs of this suite). Exit code 0 is a
    # success for mp.spawn; a job that raised never gets here.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _save_coverage() -> None:
    """os._exit skips coverage's exit handler: under `make test` (pytest-cov) a spawned rank saves its data here."""
    try:
        import coverage
    except ImportError:
        return
    cov = coverage.Coverage.current()
    if cov is not None:
        cov.stop()
        cov.save()


def _watch_files(under: Path) -> list:
    """From now on, record every open/create/rename/delete/listing of a path below ``under`` in this process."""
    seen, prefix = [], str(under)

    def hook(event, args):
        if event in ("open", "os.mkdir", "os.rename", "os.remove", "os.rmdir", "os.listdir", "os.scandir"):
            path = args[0] if args else None
            if isinstance(path, (str, os.PathLike)) and os.fspath(path).startswith(prefix):
                seen.append((event, os.fspath(path)))

    sys.addaudithook(hook)  # cannot be removed: only ever called in a spawned process
    return seen


def _capture_evaluated_weights() -> dict:
    """cfg.name -> the state_dict ``train`` hands to evaluate_model (EMA or final weights) in this process."""
    seen, real = {}, evaluate.evaluate_model

    def capture(model, cfg, *args, **kw):
        seen[cfg.name] = {k: v.detach().clone() for k, v in model.state_dict().items()}
        return real(model, cfg, *args, **kw)

    evaluate.evaluate_model = capture
    return seen


def assert_bitwise(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# -------------------------------------------------------------------------------- DDP training
def _pixel_start(self, x, eps):
    """A PGD start that is a function of the pixels only, so a 1-rank and a 2-rank run start alike.

    Each rank draws its own random starts (distributed.py), so two runs of different sizes never share
    them; and no start is no option: TRADES' and GKL's attack objectives have an exactly zero gradient
    at x_adv = x, so their first step would be the sign of rounding noise.
    """
    return attacks._project(x + 0.05 * torch.sin(997.0 * x + 1.0), x, eps, self.norm)


def _bn_cnn(num_classes: int = 10, in_channels: int = 1) -> torch.nn.Module:
    """tiny_cnn's first block with BatchNorm: buffers that change every step."""
    return torch.nn.Sequential(torch.nn.Conv2d(in_channels, 8, 3, padding=1), torch.nn.BatchNorm2d(8),
                               torch.nn.ReLU(), torch.nn.MaxPool2d(2), torch.nn.AdaptiveAvgPool2d(4),
                               torch.nn.Flatten(), torch.nn.Linear(128, num_classes))


# BatchNorm with two training forwards per step under DDP (the classic failure); only 2-rank, since
# per-rank batch statistics differ from 1-rank ones by design
BN_JOB = ("bn_trades", ["model.name=bn_cnn_test", "method.name=trades"])


def _train_worker(rank, root, runs: Path, report: Path, jobs: list):
    attacks.PGD._start = _pixel_start
    register_model("bn_cnn_test")(_bn_cnn)  # in the spawned processes only: the registry stays clean here
    touched = _watch_files(runs) if rank else []
    weights = _capture_evaluated_weights()
    for name, overrides in jobs + [BN_JOB]:
        trainers.train(cfg_for(root, f"name={name}", *overrides), runs / name)
    refusal = None
    try:  # rank 0 finds the folder taken; rank 1 must stop too, with the same message, not hang
        trainers.train(cfg_for(root, f"name={jobs[0][0]}", *jobs[0][1]), runs / jobs[0][0])
    except UserError as e:
        refusal = str(e)
    torch.save({"weights": weights, "refusal": refusal, "touched": list(touched)}, report / f"rank{rank}.pt")


JOBS = [
    ("pgd_at", ["method.name=pgd_at"]),
    ("trades", ["method.name=trades"]),  # two training forwards (natural, adversarial) per step
    ("mart", ["method.name=mart"]),
    ("gkl_at", ["method.name=gkl_at"]),  # plus the class prior, gathered from both ranks
    ("gkl_at_awp_ema", ["method.name=gkl_at", "awp.enabled=true", "awp.warmup_epochs=0", "ema.enabled=true",
                        "ema.decay=0.5"]),
    # two micro-batches of 8 per rank, DDP's all-reduce only after the second (no_sync for the first)
    ("gkl_at_accumulate", ["method.name=gkl_at", "optim.accumulate=2"]),
]


@pytest.mark.slow
def test_two_ranks_train_like_one_rank_and_only_rank0_writes(fmnist_root, tmp_path, monkeypatch):
    monkeypatch.setattr(attacks.PGD, "_start", _pixel_start)
    runs, report = tmp_path / "runs", tmp_path / "report"
    runs.mkdir()
    report.mkdir()
    spawn(_train_worker, fmnist_root, runs, report, JOBS)
    r0, r1 = (torch.load(report / f"rank{r}.pt", weights_only=False) for r in (0, 1))

    worst = {}
    for name, overrides in JOBS:
        single = trainers.train(cfg_for(fmnist_root, f"name={name}", *overrides), tmp_path / "single" / name)
        ref = load_checkpoint(tmp_path / "single" / name / "checkpoints" / "final.pt")
        got = load_checkpoint(runs / name / "checkpoints" / "final.pt")
        for part in ("model", "ema"):
            for k in ref[part] or {}:
                worst[name] = max(worst.get(name, 0.0), (ref[part][k] - got[part][k]).abs().max().item())
                torch.testing.assert_close(got[part][k], ref[part][k], atol=WEIGHT_ATOL, rtol=0, msg=f"{name} {k}")
        if name.startswith("gkl_at"):  # the prior is built from the global batch on every rank
            # micro-batches of 8 per rank vs 16 in one process: other conv kernels, logits rounded otherwise
            # (measured 1.4e-6 on the prior after one epoch)
            prior_atol = 1e-5 if "accumulate" in name else 1e-6
            torch.testing.assert_close(load_checkpoint(runs / name / "checkpoints" / "last.pt")["prior"]["prior"],
                                       load_checkpoint(tmp_path / "single" / name / "checkpoints" / "last.pt")
                                       ["prior"]["prior"], atol=prior_atol, rtol=0)
        assert_bitwise(r0["weights"][name], r1["weights"][name])  # both ranks evaluate the same weights
        # outputs exist once: the same files as the single-process run, one metrics line per epoch and eval
        files = sorted(str(p.relative_to(runs / name)) for p in (runs / name).rglob("*") if p.is_file())
        single_files = sorted(str(p.relative_to(tmp_path / "single" / name))
                              for p in (tmp_path / "single" / name).rglob("*") if p.is_file())
        assert files == single_files
        assert len((runs / name / "metrics.jsonl").read_text().splitlines()) == 2
        saved = json.loads((runs / name / "results.json").read_text())
        assert saved.keys() == single.keys() - {"wandb_dir"}
    bn = BN_JOB[0]
    assert_bitwise(r0["weights"][bn], r1["weights"][bn])  # running statistics included
    assert not torch.allclose(r0["weights"][bn]["net.1.running_var"], torch.ones(8))  # they did change
    print("max |w_2ranks - w_1rank| per method:", {k: f"{v:.2g}" for k, v in worst.items()})
    assert 0 < max(worst.values())  # really two different computations, equal to float rounding
    assert r1["touched"] == []  # rank 1 never opened, created, renamed or listed anything in the run folders
    assert "already holds a run" in r0["refusal"] and r1["refusal"] == r0["refusal"]


class Interrupt(Exception):
    pass


def _interrupted_worker(rank, root, tmp: Path, overrides: list):
    trainers.train(cfg_for(root, *overrides), tmp / "ref")  # uninterrupted reference
    real, calls = trainers._checkpoint, []

    def dying(*args, **kw):  # rank 0 (the only one that writes) dies after its 2nd checkpoint reached the disk
        real(*args, **kw)
        calls.append(1)
        if len(calls) == 2:
            raise Interrupt

    trainers._checkpoint = dying
    trainers.train(cfg_for(root, *overrides), tmp / "run")


def _resume_worker(rank, root, tmp: Path, overrides: list):
    trainers.train(cfg_for(root, *overrides), tmp / "run", resume=True)


@pytest.mark.slow
def test_interrupted_two_rank_run_resumes_bitwise(fmnist_root, tmp_path):
    # random starts and augmentation: each rank's own RNG stream must come back on resume
    over = ["method.name=trades", "attack.random_start=normal", "data.augment=crop_flip", "data.subset=192",
            "optim.epochs=2", "runtime.checkpoint_every_steps=4", "ema.enabled=true", "ema.decay=0.5"]
    with pytest.raises(SPAWN_FAILED, match="Interrupt|lost contact"):
        spawn(_interrupted_worker, fmnist_root, tmp_path, over)
    assert (tmp_path / "run" / "checkpoints" / "last.pt").exists()
    assert not (tmp_path / "run" / "checkpoints" / "final.pt").exists()
    spawn(_resume_worker, fmnist_root, tmp_path, over)
    a = load_checkpoint(tmp_path / "ref" / "checkpoints" / "final.pt")
    b = load_checkpoint(tmp_path / "run" / "checkpoints" / "final.pt")
    assert_bitwise(a["model"], b["model"])
    assert_bitwise(a["ema"], b["ema"])


# --------------------------------------------------------------------------------- sharded AutoAttack
AA_EPS, AA_N, AA_BS = 0.06, 32, 4  # APGD-CE leaves 10 robust points (3 APGD-T chunks), 6 in the first half


def make_aa(model, state_path=None) -> AutoAttack:
    return AutoAttack(model, eps=AA_EPS, version="custom", attacks=["apgd-ce", "apgd-t"], batch_size=AA_BS,
                      progress=False, state_path=state_path)


def _aa_worker(rank, weights, x, y, report: Path, state_path, die_on_call: int):
    model = create_model("tiny_cnn", num_classes=10, in_channels=1)
    model.load_state_dict(weights)
    if die_on_call and rank == 1:
        real, calls = attacks._run_attack, []

        def dying(*args):
            calls.append(1)
            if len(calls) == die_on_call:
                raise Interrupt
            return real(*args)

        attacks._run_attack = dying
    torch.save(make_aa(model, state_path)(x, y), report / f"rank{rank}.pt")


def same_points(a, b):
    assert torch.equal(a.clean_correct, b.clean_correct)
    assert torch.equal(a.robust_correct, b.robust_correct)
    assert torch.equal(a.broken_by, b.broken_by)
    assert a.per_attack_robust_acc == b.per_attack_robust_acc and a.robust_acc == b.robust_acc


@pytest.mark.slow
def test_sharded_autoattack_equals_one_process_and_resumes(trained_tiny_fmnist, tmp_path):
    t = trained_tiny_fmnist
    x, y, weights = t.x[:AA_N], t.y[:AA_N], t.model.state_dict()
    single = make_aa(t.model)(x, y)
    start_t = (single.broken_by == -1) | (single.broken_by == 2)  # robust when APGD-T starts
    # the hard case: fixed half-and-half point shards would cut APGD-T's chunks differently
    assert start_t[:AA_N // 2].sum() % AA_BS != 0 and start_t.sum() > 2 * AA_BS
    assert (single.broken_by == 2).any()  # APGD-T breaks something the single process found

    state = tmp_path / "aa_state.pt"
    with pytest.raises(SPAWN_FAILED, match="Interrupt|lost contact"):  # rank 1 dies in APGD-CE's second round
        spawn(_aa_worker, weights, x, y, tmp_path, state, 2)
    saved = torch.load(state, weights_only=True)
    assert saved["current"] == "apgd-ce" and saved["chunks_done"] == 2  # round 1 of 3 was saved
    shutil.copy(state, tmp_path / "copy.pt")

    spawn(_aa_worker, weights, x, y, tmp_path, state, 0)
    for rank in (0, 1):  # clean pass and APGD-CE round 1 in the killed job, the rest after the resume
        same_points(torch.load(tmp_path / f"rank{rank}.pt", weights_only=False), single)
    # the state file is AutoAttack's own format: one process finishes what two started
    same_points(make_aa(t.model, tmp_path / "copy.pt")(x, y), single)


# ------------------------------------------------------------------------------------- torchrun CLI
def torchrun(*args, cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "-m", "advgkl", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def write_recipe(path: Path, root, *overrides) -> Path:
    path.write_text(yaml.safe_dump(cfg_for(root, *overrides).to_dict()))
    return path


@pytest.mark.slow
def test_torchrun_train_then_eval_match_one_process(fmnist_root, tmp_path):
    aa = ["eval.version=custom", "eval.attacks=[apgd-ce, apgd-t]", f"eval.n_examples={AA_N // 2}",
          f"eval.batch_size={AA_BS}", f"eval.eps={AA_EPS}", "data.subset=128"]
    recipe = write_recipe(tmp_path / "recipe.yaml", fmnist_root, *aa)
    run = torchrun("train", recipe, "--out", tmp_path / "run", cwd=tmp_path)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("results:") == 1 and run.stdout.count("advgkl train ->") == 1  # rank 0 speaks
    assert not (tmp_path / "runs").exists()
    trained = json.loads((tmp_path / "run" / "results.json").read_text())

    final = tmp_path / "run" / "checkpoints" / "final.pt"
    assert cli.main(["eval", str(final), "--out", str(tmp_path / "ev1"), "--wandb", "disabled"]) == 0
    ev = torchrun("eval", final, "--out", tmp_path / "ev2", "--wandb", "disabled", cwd=tmp_path)
    assert ev.returncode == 0, ev.stderr[-3000:]
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("ev1", "ev2"))
    assert one["per_point"]["model"] == two["per_point"]["model"] == trained["per_point"]["final"]
    for key in ("clean_acc", "autoattack_acc", "per_attack_robust_acc", "n_examples"):
        assert one[key] == two[key] == trained[key], key
    assert one.keys() == two.keys()


@pytest.mark.slow
def test_torchrun_stops_every_rank_with_a_message(fmnist_root, tmp_path):
    recipe = write_recipe(tmp_path / "recipe.yaml", fmnist_root, "data.batch_size=33")
    run = torchrun("train", recipe, "--out", tmp_path / "run", cwd=tmp_path)
    assert run.returncode != 0
    for rank in (0, 1):
        assert f"advgkl train (rank {rank} of 2): error: data.batch_size=33 is the global batch" in run.stderr


# ------------------------------------------------------------------------------- single-process parts
def test_rank_slices_interleave_back_into_the_global_batch(fmnist_root):
    from advgkl.data import load_dataset

    images, labels = load_dataset("fashion_mnist", fmnist_root, train=True)
    images, labels = images[:200], labels[:200]
    gen = (images[:50].flip(-1).contiguous(), labels[:50])
    kw = dict(augment="crop_flip", seed=3, generated=gen, generated_ratio=0.25)
    whole = list(BatchLoader(images, labels, 24, **kw))
    shares = [list(BatchLoader(images, labels, 24, rank=r, world_size=3, **kw)) for r in range(3)]
    for k, (x, y) in enumerate(whole):
        parts = [shares[r][k] for r in range(3)]
        assert all(len(p[1]) == 8 for p in parts)
        assert torch.equal(torch.stack([p[0] for p in parts], 1).flatten(0, 1), x)
        assert torch.equal(torch.stack([p[1] for p in parts], 1).flatten(0, 1), y)


def test_global_batch_must_split_evenly():
    assert distributed.local_batch_size(128, distributed.World(0, 8, 0, True)) == 16
    with pytest.raises(UserError, match="data.batch_size=130 .* multiple of the 8 processes .* 128 or 136"):
        distributed.local_batch_size(130, distributed.World(0, 8, 0, True))
    with pytest.raises(UserError, match="use e.g. 8"):
        distributed.local_batch_size(4, distributed.World(0, 8, 0, True))


def test_single_process_world_is_a_no_op():
    world = distributed.current()
    assert world == distributed.World() and world.is_main and not world.distributed
    t = torch.arange(6.0).reshape(3, 2)
    assert world.gather_rows(t) is t and world.broadcast("x") == "x" and world.gather_object(1) == [1]
    assert world.all_finite(torch.tensor(1.0)) and not world.all_finite(torch.tensor(float("nan")))
    with pytest.raises(UserError, match="boom"):
        world.agree(UserError("boom"))
    model = torch.nn.BatchNorm2d(3)
    assert world.convert_sync_bn(model, True) is model


def test_ddp_settings_a_user_can_get_wrong_are_messages():
    world = distributed.World(1, 2, 1, True)
    with pytest.raises(UserError, match="every process uses its own"):
        world.device(torch.device("cuda", 1))
    assert world.device(torch.device("cuda")) == torch.device("cuda", 1)


def _sync_bn_worker(rank, root, tmp: Path):
    """SyncBatchNorm under a 2-rank gloo group: the conversion, DDP around it, and checkpoints both ways."""
    world = distributed.current()
    torch.manual_seed(0)
    plain = create_model("preact_resnet18", num_classes=10, in_channels=1).eval()
    with torch.no_grad():  # BatchNorm statistics that are not the initial 0 / 1
        for m in plain.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.uniform_(-0.5, 0.5)
                m.running_var.uniform_(0.5, 2.0)
    n_bn = sum(isinstance(m, torch.nn.BatchNorm2d) for m in plain.modules())
    synced = world.convert_sync_bn(copy.deepcopy(plain), True)
    assert n_bn > 0 and sum(isinstance(m, torch.nn.SyncBatchNorm) for m in synced.modules()) == n_bn
    assert not any(type(m) is torch.nn.BatchNorm2d for m in synced.modules())
    assert synced.state_dict().keys() == plain.state_dict().keys()
    path = tmp / f"synced_{rank}.pt"
    atomic_torch_save({"format": FORMAT, "model": synced.state_dict()}, path)
    back = create_model("preact_resnet18", num_classes=10, in_channels=1).eval()
    back.load_state_dict(load_checkpoint(path)["model"])  # what `advgkl eval` does with a sync_bn run
    again = world.convert_sync_bn(create_model("preact_resnet18", num_classes=10, in_channels=1), True).eval()
    again.load_state_dict(torch.load(path, weights_only=True)["model"])  # what a resume does
    x = torch.rand(4, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = plain(x)
        assert torch.equal(back(x), expected) and torch.equal(synced.eval()(x), expected)
        assert torch.equal(again(x), expected)
    # training on CPU with sync_bn is refused with one line on every rank, before any data is read
    try:
        trainers.train(cfg_for(root, "runtime.sync_bn=true"), tmp / "run")
    except UserError as e:
        (tmp / f"refused_{rank}.txt").write_text(str(e))


def test_sync_batchnorm_converts_under_gloo_and_its_checkpoints_load_both_ways(fmnist_root, tmp_path):
    spawn(_sync_bn_worker, fmnist_root, tmp_path)
    for rank in (0, 1):
        assert (tmp_path / f"refused_{rank}.txt").read_text().startswith("runtime.sync_bn needs CUDA")
    assert not (tmp_path / "run" / "checkpoints").exists()


def _group_errors_worker(rank, tmp: Path):
    world = distributed.current()
    mask = torch.tensor([rank == 0, False])
    assert world.any(mask).tolist() == [True, False] and distributed.World().any(mask) is mask
    try:  # inside a job, an error that is not a lost peer passes through unchanged
        with distributed.process_group():
            raise RuntimeError("a bug in the job")
    except RuntimeError as e:
        assert str(e) == "a bug in the job" and not isinstance(e, UserError)
    model = create_model("tiny_cnn", num_classes=10, in_channels=1)
    aa = AutoAttack(model, version="custom", attacks=["apgd-ce"], eps=0.1, batch_size=4, progress=False)
    x, y = torch.rand(4, 1, 28, 28), torch.tensor([0, 1, 2, 10])
    try:  # sharded AutoAttack checks the labels like the single-process one, on every rank
        aa(x, y)
    except UserError as e:
        (tmp / f"labels_{rank}.txt").write_text(str(e))
    # a finished sharded evaluation is re-reported from its state; another evaluation's state is refused
    x = torch.rand(8, 1, 28, 28, generator=torch.Generator().manual_seed(0))
    y = torch.arange(8)
    state = tmp / "aa_state.pt"
    aa = AutoAttack(model, version="custom", attacks=["apgd-ce"], eps=0.1, batch_size=4, progress=False,
                    state_path=state)
    first = aa(x, y)
    again = aa(x, y)
    assert torch.equal(again.robust_correct, first.robust_correct) and again.robust_acc == first.robust_acc
    other = AutoAttack(model, version="custom", attacks=["apgd-ce"], eps=0.2, batch_size=4, progress=False,
                       state_path=state)
    try:
        other(x, y)
    except UserError as e:
        (tmp / f"state_{rank}.txt").write_text(str(e))


def test_group_helpers_pass_bugs_through_and_sharded_autoattack_checks_its_inputs(tmp_path):
    spawn(_group_errors_worker, tmp_path)
    for rank in (0, 1):
        assert (tmp_path / f"labels_{rank}.txt").read_text() == (
            "labels must lie in [0, 9] (the model has 10 outputs); got [0, 10]")
        assert (tmp_path / f"state_{rank}.txt").read_text().startswith(
            f"AutoAttack state {tmp_path / 'aa_state.pt'} belongs to a different evaluation (")


def test_two_ranks_resume_a_one_process_checkpoint_with_a_note(fmnist_root, tmp_path, capfd):
    """Another number of processes on resume: data order and weights continue, the random starts cannot."""
    over = ["optim.epochs=2"]
    one = tmp_path / "run"
    cfg = cfg_for(fmnist_root, *over)
    real = trainers._checkpoint
    try:  # one process stops after epoch 1's checkpoint
        trainers._checkpoint = lambda *a, **kw: (real(*a, **kw), (_ for _ in ()).throw(KeyboardInterrupt))
        with pytest.raises(KeyboardInterrupt):
            trainers.train(cfg, one)
    finally:
        trainers._checkpoint = real
    assert load_checkpoint(one / "checkpoints" / "last.pt")["rng_ranks"] is None  # written by one process
    spawn(_resume_worker, fmnist_root, tmp_path, over)
    out = capfd.readouterr().out
    assert "resumed from" in out and "at epoch 1, batch 0" in out
    assert ("note: the checkpoint was written by 1 process(es), this job has 2: data order and weights "
            "continue exactly, the attacks' random starts do not") in out
    assert load_checkpoint(one / "checkpoints" / "final.pt")["epoch"] == 2


def _hang_worker(rank, report: Path):
    group = dist.new_group(timeout=datetime.timedelta(seconds=2))
    if rank == 1:  # hangs: never joins the collective, then leaves quietly
        time.sleep(6)
        return
    try:
        with distributed.process_group():
            dist.all_reduce(torch.ones(1), group=group)
    except UserError as e:
        (report / "message.txt").write_text(str(e))


@pytest.mark.slow
def test_a_hung_rank_ends_the_collective_with_a_message(tmp_path):
    spawn(_hang_worker, tmp_path)
    message = (tmp_path / "message.txt").read_text()
    assert message.startswith("rank 0 of 2 lost contact with the other processes (")
    assert "another rank failed (its error is in the log above) or hung" in message
