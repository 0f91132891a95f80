"""The GPU check: every GPU figure advgkl reports, measured side by side in one run.

    make gpu-prep                                     # CPU machine: wheels + Fashion-MNIST into .gpu/
    python3 benchmarks/gpu_check.py --out DIR         # GPU machine (= make gpu-check GPU_OUT=DIR)
    make gpu-check SMOKE=1                            # CPU, toy sizes: the same code, run as a CI test

The GPU machine has torch but no network, pyautoattack or robustbench: when pyautoattack does not import,
the wheels in .gpu/wheels are installed into .gpu/site first, and .gpu/data is the data root. docs/gpu.md
says how to run it through the device tool and what each number means.

Sections, in this order; each writes one file into --out, and summary.md / summary.json close the run:
  e2e         `advgkl train` of the demo recipe with bf16, channels_last and torch.compile, ending with
              standard AutoAttack on 500 test points; then plain fp32 pyautoattack on the same weights
              and points, whose per-point verdicts must be identical.
  step        one training step, images/s: WRN-34-10 GKL-AT and PreActResNet-18 PGD-10 at batch 128 and
              256 on CIFAR-shaped synthetic data, advgkl (eager) against the reference-style baseline of
              benchmarks/bench_train_step.py; MFU against the bf16 peak.
  data        BatchLoader images/s (CIFAR-shaped uint8, crop + flip) against what the fastest step consumes.
  profile     the 10 kernels with the most device time in WRN-34-10 GKL-AT steps (torch.profiler).
  ddp         world-size-1 DDP: `torchrun --nproc_per_node 1 -m advgkl train` against plain `advgkl train`.
  memory      peak memory and time of a WRN-34-10 GKL-AT step at batch 128 (bf16, channels_last) with
              accumulate 1, 2 and 4, each with and without activation checkpointing
              (benchmarks/bench_memory.py), appended to step.txt.
  autoattack  WRN-34-10 standard AutoAttack, advgkl against plain pyautoattack on the same 1,000 points.
              The weights come from a short plain training on synthetic data: a timing, not a robustness
              number.
  compile     the step section's WRN-34-10 GKL-AT batch-128 case with torch.compile, appended to step.txt
              (last: compiling WRN-34-10 takes minutes).
A section that would start with less time left than it needs (--budget-s) is skipped and says so; the
summary files are rewritten after every section, so a run killed at its time limit keeps what it measured.
Skipped sections run in a second call: --sections autoattack compile.
Exit status 1 when a section raised; missed targets are reported, not failures.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

# (check, target) pairs of the GPU issue; the summary marks each measured value against its target
TARGETS = {
    "e2e_verdicts": "identical per-point verdicts",
    "step_wrn_gkl": ">= 4x the baseline and >= 30 % MFU",
    "step_preact_pgd": ">= 4x the baseline",
    "autoattack": ">= 2x plain pyautoattack, identical verdicts",
    "data": ">= 20x what the step consumes",
    "ddp": "world-size-1 overhead < 5 %",
    "memory": "activation checkpointing and accumulate 4 each lower the step's peak memory",
}


# ------------------------------------------------------------------------------------------ set-up
def prepare_environment(prep: Path) -> None:
    """Make pyautoattack importable (from prep/wheels when it is not) and prep/data the data root."""
    paths = [str(ROOT)]
    try:
        import pyautoattack  # noqa: F401
    except ImportError:
        site = install_wheels(prep, prep / "site")
        sys.path.insert(0, str(site))
        paths.append(str(site))
    if (prep / "data").is_dir() and "ADVGKL_DATA" not in os.environ:
        os.environ["ADVGKL_DATA"] = str((prep / "data").resolve())
    # subprocesses (`python -m advgkl`, torchrun) see the same packages
    os.environ["PYTHONPATH"] = os.pathsep.join(paths + [p for p in [os.environ.get("PYTHONPATH")] if p])


def install_wheels(prep: Path, target: Path) -> Path:
    """pip install --no-index every wheel in prep/wheels into target (once); returns target."""
    wheels = sorted((prep / "wheels").glob("*.whl"))
    if not wheels:
        sys.exit(f"gpu-check: pyautoattack is not installed and {prep / 'wheels'} holds no wheels; "
                 "run `make gpu-prep` on a machine with network and carry .gpu/ along")
    if not (target / "pyautoattack").is_dir():
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                        "--upgrade", "--target", str(target), *map(str, wheels)], check=True)
    return target


class Report:
    """One section's output: printed, and written to its file in --out as it goes."""

    def __init__(self, path: Path, append: bool = False):
        self.path = path
        if not append:
            path.write_text("")

    def __call__(self, line: str = "") -> None:
        print(line, flush=True)
        with self.path.open("a") as f:
            f.write(line + "\n")


def run_logged(cmd: list[str], log: Report, timeout: float, cwd: Path, env: dict | None = None) -> tuple[int, float]:
    """Run cmd, copying its output into the report; returns (exit code, wall seconds)."""
    log(f"$ {' '.join(map(str, cmd))}")
    start = time.perf_counter()
    proc = subprocess.run(list(map(str, cmd)), cwd=cwd, capture_output=True, text=True, timeout=timeout,
                          env=None if env is None else {**os.environ, **env})
    wall = time.perf_counter() - start
    for line in (proc.stdout + proc.stderr).splitlines():
        if line.strip():
            log(f"  {line}")
    log(f"exit {proc.returncode} after {wall:.1f} s")
    return proc.returncode, wall


def epoch_records(run: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [r for r in lines if "epoch" in r]


# ------------------------------------------------------------------------------------------ sections
def section_e2e(ctx) -> dict:
    import torch

    from advgkl.attacks import AutoAttack
    from advgkl.checkpoint import load_checkpoint
    from advgkl.config import from_dict
    from advgkl.evaluate import load_test_points
    from advgkl.runtime import build_model, pick_memory_format

    log, size = ctx.report("e2e.txt"), ctx.size
    run = ctx.work / "e2e"
    overrides = [f"runtime.device={ctx.device.type}", "runtime.amp=bf16", "runtime.channels_last=on",
                 "runtime.compile=true", f"eval.n_examples={size['e2e_points']}", "eval.version=standard",
                 "logging.wandb=disabled", "logging.progress=false", "name=gpu_check_e2e", *size["e2e_overrides"]]
    code, wall = run_logged([sys.executable, "-m", "advgkl", "train", ROOT / "experiments/recipes/fmnist_gkl_demo.yaml",
                             *overrides, "--out", run], log, ctx.remaining(), ROOT)
    if code:
        raise RuntimeError(f"advgkl train exited {code}")
    results = json.loads((run / "results.json").read_text())
    ours = torch.tensor(results["per_point"][results["evaluated_weights"]]["robust_correct"], dtype=torch.bool)

    ckpt = load_checkpoint(run / "checkpoints" / "final.pt")
    cfg = from_dict(ckpt["config"])
    model = build_model(cfg)
    model.load_state_dict(ckpt["ema"] if ckpt.get("ema") is not None else ckpt["model"])
    model = model.to(ctx.device, memory_format=pick_memory_format(cfg, ctx.device)).eval()  # as evaluate_model
    x, y = load_test_points(cfg, cfg.eval.n_examples)
    aa = AutoAttack(model, norm=cfg.attack.norm, eps=cfg.eval.eps or cfg.attack.eps, version="standard",
                    batch_size=cfg.eval.batch_size, seed=cfg.runtime.seed, device=ctx.device, progress=False)
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False  # plain fp32
    plain = aa.pyautoattack(10)
    plain.verbose = False
    start = time.perf_counter()
    _, y_adv = plain.run_standard_evaluation(x.to(ctx.device), y.to(ctx.device), batch_size=cfg.eval.batch_size)
    plain_s = time.perf_counter() - start
    theirs = (y_adv.cpu() == y).bool()
    differ = int((theirs != ours).sum())
    epochs = epoch_records(run)
    out = {"train_command_s": wall, "train_s": results["wall_time_s"]["train"], "eval_s": results["wall_time_s"]["eval"],
           "images_per_s": [r["images_per_s"] for r in epochs], "compiled_graphs": [r.get("compiled_graphs") for r in epochs],
           "clean_acc": results["clean_acc"], "autoattack_acc": results["autoattack_acc"],
           "plain_autoattack_acc": theirs.float().mean().item(), "plain_autoattack_s": plain_s,
           "n_points": len(ours), "points_that_differ": differ, "passed": differ == 0}
    log(f"advgkl: clean {out['clean_acc']:.4f}, AutoAttack {out['autoattack_acc']:.4f} on {len(ours)} points; "
        f"plain fp32 pyautoattack {out['plain_autoattack_acc']:.4f} in {plain_s:.1f} s; per-point verdicts "
        f"that differ: {differ}")
    log(f"training images/s per epoch: {', '.join(f'{v:,.0f}' for v in out['images_per_s'])}; graphs compiled per "
        f"epoch: {out['compiled_graphs']}")
    ctx.summary("e2e_verdicts", f"{differ} of {len(ours)} points differ (AutoAttack {out['autoattack_acc']:.3f})",
                differ == 0)
    return out


def section_step(ctx) -> dict:
    import torch

    import bench_train_step as bts
    from advgkl.models import create_model, model_info

    log, size = ctx.report("step.txt", append=ctx.compile_pass), ctx.size  # compile: appended, 8 files in all
    args = argparse.Namespace(device=ctx.device.type, amp="auto", channels_last="auto", compile=False,
                              warmup=size["step_warmup"], repeats=size["step_repeats"])
    peak = ctx.peak_tflops
    log(f"{'model':<16} {'method':<7} {'batch':>5} {'variant':<15} {'images/s':>9} {'step_ms':>8} {'peak_mem':>9} "
        f"{'MFU':>6} {'loss':>9}  vs baseline")
    out = {}
    for key, model_name, method, batches in size["step_cases"]:
        torch.manual_seed(0)
        state = create_model(model_name, num_classes=10, in_channels=3).state_dict()
        flops = model_info(model_name, num_classes=10, image_shape=(3, 32, 32)).flops
        g = torch.Generator().manual_seed(0)
        prior_rows = torch.softmax(2 * torch.randn(10, 10, generator=g), 1).to(ctx.device)
        for batch in batches:
            compiled = ctx.compile_pass and (model_name, method, batch) == size["compile_case"]
            if ctx.compile_pass and not compiled:
                continue
            variants = ["baseline", "advgkl+compile" if compiled else "advgkl"]  # a baseline beside every case
            res = bts.run_case(model_name, method, batch, args, ctx.device, 10, state, prior_rows, variants=variants)
            base = res.get("baseline")
            for variant, r in res.items():
                if r.note:
                    log(f"{model_name:<16} {method:<7} {batch:>5} {variant:<15} {r.note}")
                    continue
                mfu = flops * bts.forward_passes(method) * r.images_per_s / (peak * 1e12) if peak else None
                ratio = r.images_per_s / base.images_per_s if base and base.images_per_s else None
                out[f"{model_name}/{method}/b{batch}/{variant}"] = {
                    "images_per_s": r.images_per_s, "step_ms": r.step_ms, "peak_mem_gib": r.peak_mem_gib,
                    "mfu": mfu, "ratio": ratio, "loss": r.loss}
                log(f"{model_name:<16} {method:<7} {batch:>5} {variant:<15} {r.images_per_s:>9.1f} {r.step_ms:>8.1f} "
                    f"{(f'{r.peak_mem_gib:.2f}GiB' if r.peak_mem_gib is not None else 'n/a'):>9} "
                    f"{(f'{mfu:.1%}' if mfu is not None else 'n/a'):>6} {r.loss:>9.5f}  "
                    f"{(f'{ratio:.2f}x' if ratio else '')}")
        ctx.step_results.update({k: v for k, v in out.items() if not k.endswith("/baseline")})
        best = max((v for k, v in ctx.step_results.items() if k.startswith(f"{model_name}/{method}/") and v["ratio"]
                    and "baseline" not in k), key=lambda v: v["ratio"], default=None)
        if best is None:
            continue
        if key == "step_wrn_gkl":
            ok = best["ratio"] >= 4 and (best["mfu"] or 0) >= 0.30
            mfu = f", MFU {best['mfu']:.1%}" if best["mfu"] is not None else ", MFU n/a"
            ctx.summary(key, f"{best['ratio']:.2f}x{mfu} ({model_name} {method})", ok)
        else:
            ctx.summary(key, f"{best['ratio']:.2f}x ({model_name} {method})", best["ratio"] >= 4)
    log(f"peak dense bf16 for MFU: {peak or 'n/a'} TFLOP/s; forward-equivalent passes per image: "
        f"gkl_at {bts.forward_passes('gkl_at')}, pgd_at {bts.forward_passes('pgd_at')}")
    ctx.step_rates.update({k: v["images_per_s"] for k, v in out.items() if "baseline" not in k})
    return out


def section_compile(ctx) -> dict:
    """The step section's WRN-34-10 GKL-AT case again, compiled; last, since compiling WRN-34-10 takes minutes."""
    ctx.compile_pass = True
    try:
        return section_step(ctx)
    finally:
        ctx.compile_pass = False


def section_data(ctx) -> dict:
    import torch

    from advgkl.data import BatchLoader
    from bench_data import images_per_second

    log, size = ctx.report("data.txt"), ctx.size
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (size["data_n"], 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (size["data_n"],), generator=g)
    out = {}
    for batch in size["data_batches"]:
        loader = BatchLoader(images, labels, batch, augment="crop_flip", device=ctx.device, seed=0)
        out[f"b{batch}"] = images_per_second(loader, ctx.device, 1)
        log(f"BatchLoader crop_flip n={size['data_n']} batch={batch} device={ctx.device}: {out[f'b{batch}']:,.0f} images/s")
    need = max(ctx.step_rates.values(), default=None)
    if need:
        rate = max(out.values())
        out["fastest_step_images_per_s"], out["ratio"] = need, rate / need
        log(f"the fastest measured advgkl step consumes {need:,.0f} images/s: the loader delivers {rate / need:,.1f}x that")
        ctx.summary("data", f"{rate / need:,.1f}x the fastest step ({rate:,.0f} vs {need:,.0f} images/s)", rate / need >= 20)
    return out


def section_ddp(ctx) -> dict:
    log, size = ctx.report("ddp.txt"), ctx.size
    recipe = ctx.work / "ddp.yaml"
    recipe.write_text(json.dumps({  # JSON is YAML
        "name": "gpu_check_ddp",
        "data": {"dataset": "fashion_mnist", "subset": size["ddp_subset"], "batch_size": size["ddp_batch"]},
        "model": {"name": size["ddp_model"]}, "method": {"name": "pgd_at"}, "attack": {"eps": 0.1, "steps": 5},
        "optim": {"lr": 0.05, "epochs": 2},
        "eval": {"version": "none", "n_examples": 100, "honesty_checks": False},
        "logging": {"wandb": "disabled", "progress": False}, "runtime": {"device": ctx.device.type, "seed": 0}}))
    import torch

    # torchrun sets OMP_NUM_THREADS=1 unless it is set: both runs get the same CPU threads
    env = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(torch.get_num_threads()))}
    rates = {}
    for name, launcher in (("plain", [sys.executable, "-m", "advgkl"]),
                           ("torchrun", [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                         "--nproc_per_node", "1", "-m", "advgkl"])):
        run = ctx.work / f"ddp_{name}"
        code, _ = run_logged([*launcher, "train", recipe, "--out", run], log, ctx.remaining(), ROOT, env)
        if code:
            raise RuntimeError(f"{name} training exited {code}")
        rates[name] = epoch_records(run)[-1]["images_per_s"]  # epoch 2: past cuDNN autotuning and warm-up
    overhead = rates["plain"] / rates["torchrun"] - 1
    log(f"epoch-2 images/s: plain {rates['plain']:,.0f}, torchrun world size 1 {rates['torchrun']:,.0f}: "
        f"overhead {overhead:+.1%}")
    ctx.summary("ddp", f"{overhead:+.1%} ({size['ddp_model']} PGD-AT, batch {size['ddp_batch']})", overhead < 0.05)
    return {**rates, "overhead": overhead}


def section_profile(ctx) -> dict:
    import torch
    from torch.profiler import ProfilerActivity, profile

    import bench_train_step as bts
    from advgkl.models import create_model

    log, size = ctx.report("profile.txt"), ctx.size
    model_name, batch = size["profile_case"]
    args = argparse.Namespace(device=ctx.device.type, amp="auto", channels_last="auto", compile=False)
    cfg = bts.library_config("gkl_at", model_name, batch, 10, args)
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10, in_channels=3).to(ctx.device)
    prior = bts.losses.ClassPrior(10, bts.GKL["prior_temperature"]).to(ctx.device)
    step = bts.LibraryStep(model, cfg, prior, ctx.device)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, generator=g).to(ctx.device)
    y = torch.randint(0, 10, (batch,), generator=g).to(ctx.device)
    for _ in range(2):
        step.step(x, y)
    bts.sync(ctx.device)
    cuda = ctx.device.type == "cuda"
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        for _ in range(size["profile_steps"]):
            step.step(x, y)
        bts.sync(ctx.device)
    events = prof.key_averages()
    if cuda:  # kernels: the events that ran on the device
        rows = [e for e in events if str(getattr(e, "device_type", "")).endswith("CUDA")]
        timer = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    else:
        rows, timer = list(events), "self_cpu_time_total"
    total = sum(getattr(e, timer) for e in rows) or 1.0
    rows.sort(key=lambda e: getattr(e, timer), reverse=True)
    log(f"top 10 {'CUDA kernels' if cuda else 'CPU ops (no GPU)'} by self time over {size['profile_steps']} "
        f"{model_name} GKL-AT steps at batch {batch} (advgkl variant, eager):")
    log(f"{'share':>6} {'ms':>9} {'calls':>6}  name")
    top = []
    for e in rows[:10]:
        ms = getattr(e, timer) / 1e3
        top.append({"name": e.key, "ms": ms, "calls": e.count, "share": getattr(e, timer) / total})
        log(f"{getattr(e, timer) / total:>6.1%} {ms:>9.2f} {e.count:>6}  {e.key[:110]}")
    return {"timer": timer, "top": top}


def section_memory(ctx) -> dict:
    """bench_memory's table: one GKL-AT step's peak memory and time, accumulate x activation checkpointing."""
    import torch

    import bench_memory as bm

    log, size = ctx.report("step.txt", append=True), ctx.size  # appended: 8 files in all
    model_name, kw, batch, image = size["memory_case"]
    amp = ctx.device.type == "cuda"
    log(f"--- memory: one GKL-AT step (attack + loss + backward + SGD), {'bf16' if amp else 'fp32'} channels_last, "
        f"{image}x{image}; peak = {'max_memory_allocated' if amp else 'ru_maxrss in a subprocess'} above the model, "
        "optimiser state and data")
    out = bm.run_table(model_name, kw, batch, image, size["memory_accumulate"], ctx.device, amp, True, warmup=1,
                       repeats=size["memory_repeats"], threads=torch.get_num_threads(), print_fn=log)
    for line in out["failures"]:
        log(f"loss check FAIL: {line}")
    log(out["ratio_line"])
    if out["failures"]:
        raise RuntimeError("; ".join(out["failures"]))
    rows, most = out["rows"], f"acc{size['memory_accumulate'][-1]}"
    base, ckpt, acc = rows.get("acc1"), rows.get("acc1+ckpt"), rows.get(most)
    if base and ckpt and acc:
        both = rows.get(f"{most}+ckpt")
        measured = (f"{bm.fmt_bytes(base['peak_bytes'])} at accumulate 1; checkpointing {ckpt['mem_ratio']:.2f}x "
                    f"(time {ckpt['time_ratio']:.2f}x), {most} {acc['mem_ratio']:.2f}x (time {acc['time_ratio']:.2f}x)"
                    + (f", both {both['mem_ratio']:.2f}x" if both else "") + f" ({out['label']}, batch {batch})")
        ctx.summary("memory", measured, ckpt["mem_ratio"] < 1 and acc["mem_ratio"] < 1)
    return {"rows": rows, "label": out["label"], "batch": batch}


def section_autoattack(ctx) -> dict:
    import torch

    from advgkl.models import create_model
    from bench_autoattack import compare, train_quickly

    log, size = ctx.report("autoattack.txt"), ctx.size
    n, model_name = size["aa_points"], size["aa_model"]
    g = torch.Generator().manual_seed(0)
    templates = torch.rand(10, 3, 32, 32, generator=g)  # learnable synthetic classes: template + noise
    labels = torch.randint(0, 10, (4096,), generator=g)
    images = ((0.5 * templates[labels] + 0.5 * torch.rand(4096, 3, 32, 32, generator=g)) * 255).to(torch.uint8)
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10, in_channels=3).to(ctx.device)
    start = time.perf_counter()
    train_quickly(model, images[n:], labels[n:], size["aa_train_steps"], ctx.device)
    log(f"{model_name}: {size['aa_train_steps']} Adam steps of plain CE on synthetic data in "
        f"{time.perf_counter() - start:.1f} s (weights for timing, not a robustness number)")
    x, y = (images[:n].float() / 255).to(ctx.device), labels[:n].to(ctx.device)
    tag = f"model={model_name} n={n} device={ctx.device.type} version='standard' norm=Linf eps=8/255 batch=500"
    out = compare(model.eval(), x, y, 10, norm="Linf", eps=8 / 255, version="standard", attacks=None,
                  batch_size=500, device=ctx.device, tag=tag, print_fn=log)
    best = max(out["ratio"], out["ratio_channels_last"])
    ctx.summary("autoattack", f"{out['ratio']:.2f}x NCHW, {out['ratio_channels_last']:.2f}x channels_last, "
                f"verdicts identical: {out['per_point_equal']} ({model_name}, {n} points)",
                best >= 2 and out["per_point_equal"])
    return out


# in order of value per second: a run that hits the budget skips the last ones (rerun them with --sections)
SECTIONS = {"e2e": section_e2e, "step": section_step, "data": section_data, "profile": section_profile,
            "ddp": section_ddp, "memory": section_memory, "autoattack": section_autoattack, "compile": section_compile}

SIZES = {
    "full": {
        "e2e_points": 500, "e2e_overrides": [], "needs": {"e2e": 150, "step": 90, "data": 10, "profile": 20,
                                                          "ddp": 60, "memory": 60, "autoattack": 240,
                                                          "compile": 150},
        "step_cases": [("step_wrn_gkl", "wrn_34_10", "gkl_at", [128, 256]),
                       ("step_preact_pgd", "preact_resnet18", "pgd_at", [128, 256])],
        "step_warmup": 2, "step_repeats": 5, "compile_case": ("wrn_34_10", "gkl_at", 128),
        "data_n": 50_000, "data_batches": [128, 256],
        "ddp_model": "preact_resnet18", "ddp_subset": 10_240, "ddp_batch": 256,
        "profile_case": ("wrn_34_10", 128), "profile_steps": 2,
        "aa_model": "wrn_34_10", "aa_points": 1000, "aa_train_steps": 200,
        "memory_case": ("wrn_34_10", {}, 128, 32), "memory_accumulate": [1, 2, 4], "memory_repeats": 3,
    },
    "smoke": {
        "e2e_points": 8, "needs": {k: 0 for k in SECTIONS},
        "e2e_overrides": ["data.subset=256", "data.val_size=64", "optim.epochs=1", "eval.batch_size=8",
                          "eval.honesty_pgd_steps=2", "eval.val_pgd_steps=2"],
        "step_cases": [("step_wrn_gkl", "tiny_cnn", "gkl_at", [8]), ("step_preact_pgd", "tiny_cnn", "pgd_at", [8])],
        "step_warmup": 1, "step_repeats": 1, "compile_case": ("tiny_cnn", "gkl_at", 8),
        "data_n": 2048, "data_batches": [256],
        "ddp_model": "tiny_cnn", "ddp_subset": 256, "ddp_batch": 32,
        "profile_case": ("tiny_cnn", 8), "profile_steps": 1,
        "aa_model": "tiny_cnn", "aa_points": 16, "aa_train_steps": 100,
        "memory_case": ("wrn_34_10", {"depth": 10, "width": 1}, 8, 16), "memory_accumulate": [1, 4],
        "memory_repeats": 1,
    },
}


class Context:
    def __init__(self, args, device, size):
        self.out, self.device, self.size, self.args = Path(args.out), device, size, args
        self.work = Path(args.work)
        self.deadline = time.monotonic() + args.budget_s if args.budget_s else float("inf")
        self.rows: list[tuple[str, str, bool]] = []
        self.step_rates: dict[str, float] = {}
        self.step_results: dict[str, dict] = {}
        self.compile_pass = False
        self.peak_tflops = None

    def remaining(self) -> float:
        return max(1.0, self.deadline - time.monotonic()) if self.deadline != float("inf") else 3600.0

    def report(self, name: str, append: bool = False) -> Report:
        return Report(self.out / name, append)

    def summary(self, key: str, measured: str, passed: bool) -> None:
        self.rows.append((key, measured, passed))


def environment(device) -> dict:
    import torch

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    prep_commit = ROOT / ".gpu" / "commit"
    if not commit and prep_commit.is_file():  # the device copy of the tree has no .git: gpu-prep wrote it
        commit = prep_commit.read_text().strip()
    chip = torch.cuda.get_device_name() if device.type == "cuda" else f"cpu ({platform.processor() or platform.machine()})"
    return {"chip": chip, "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "torch": torch.__version__, "cuda": torch.version.cuda, "python": platform.python_version(),
            "commit": commit or "unknown", "threads": torch.get_num_threads()}


def write_summary(ctx, env: dict, results: dict, statuses: dict, smoke: bool, quiet: bool = False) -> None:
    lines = [f"# GPU check{' (SMOKE: toy sizes, not a measurement)' if smoke else ''}", "",
             f"chip {env['chip']}, {env['date']}, torch {env['torch']} (CUDA {env['cuda']}), Python {env['python']}, "
             f"commit {env['commit']}", "",
             "| check | measured | target | verdict |", "|---|---|---|---|"]
    for key, measured, passed in ctx.rows:
        lines.append(f"| {key} | {measured} | {TARGETS[key]} | {'met' if passed else 'MISSED'} |")
    lines += ["", "| section | status | seconds |", "|---|---|---|"]
    lines += [f"| {name} | {status} | {seconds:.0f} |" for name, (status, seconds) in statuses.items()]
    (ctx.out / "summary.md").write_text("\n".join(lines) + "\n")
    (ctx.out / "summary.json").write_text(json.dumps(
        {"environment": env, "smoke": smoke, "sections": {k: {"status": s, "seconds": t} for k, (s, t) in statuses.items()},
         "checks": [{"check": k, "measured": m, "target": TARGETS[k], "met": p} for k, m, p in ctx.rows],
         "results": results}, indent=1, default=str))
    if not quiet:
        print("\n".join(lines), flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "gpu_check"))
    parser.add_argument("--prep", default=str(ROOT / ".gpu"), help="what `make gpu-prep` wrote (default .gpu)")
    parser.add_argument("--work", default=None, help="scratch folder for runs (default: a temporary folder)")
    parser.add_argument("--smoke", action="store_true", help="toy sizes, any device: checks that it runs")
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--budget-s", type=float, default=None,
                        help="skip sections that would start past this many seconds (default 450; smoke: none)")
    parser.add_argument("--sections", nargs="+", default=list(SECTIONS), choices=list(SECTIONS))
    args = parser.parse_args(argv)
    prepare_environment(Path(args.prep))
    import tempfile

    import torch

    from bench_train_step import PEAK_BF16_TFLOPS

    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.budget_s is None:
        args.budget_s = 0 if args.smoke else 450
    device = torch.device(args.device)
    size = SIZES["smoke" if args.smoke else "full"]
    Path(args.out).mkdir(parents=True, exist_ok=True)
    scratch = None
    if args.work is None:
        scratch = tempfile.TemporaryDirectory(prefix="advgkl-gpu-check-")
        args.work = scratch.name
    ctx = Context(args, device, size)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # what trainers.train does on CUDA
        name = torch.cuda.get_device_name()
        ctx.peak_tflops = next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    env = environment(device)
    print(f"gpu-check: {env} budget={args.budget_s or 'none'} s sections={args.sections}", flush=True)
    results, statuses, failed = {}, {}, False
    for name in args.sections:
        needs = size["needs"][name]
        if args.budget_s and ctx.deadline - time.monotonic() < needs:
            statuses[name] = (f"skipped: under {needs} s of the budget left", 0.0)
            print(f"gpu-check: {name} skipped (under {needs} s left)", flush=True)
            continue
        start = time.perf_counter()
        print(f"gpu-check: --- {name}", flush=True)
        try:
            results[name] = SECTIONS[name](ctx)
            statuses[name] = ("ran", time.perf_counter() - start)
        except Exception as e:  # one broken section must not cost the others their numbers
            failed = True
            statuses[name] = (f"FAILED: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}",
                              time.perf_counter() - start)
            traceback.print_exc()
        if device.type == "cuda":
            torch.cuda.empty_cache()
        write_summary(ctx, env, results, statuses, args.smoke, quiet=True)  # a killed run keeps what it had
    write_summary(ctx, env, results, statuses, args.smoke)
    if scratch is not None:
        scratch.cleanup()
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
