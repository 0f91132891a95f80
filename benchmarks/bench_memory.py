"""Peak memory and time of one GKL-AT training step, with gradient accumulation and activation checkpointing.

    python benchmarks/bench_memory.py --device cuda          # wrn_34_10, batch 128, bf16 + channels_last
    python benchmarks/bench_memory.py --device cpu --threads 1   # preact_resnet18, batch 32: about a minute on 2 cores
    python benchmarks/bench_memory.py --model wrn_28_10 --batch 256 --accumulate 1 2 4 8
    python benchmarks/bench_memory.py --smoke                # WRN-10-1, batch 8, 16x16, accumulate 1 and 4 (CI)

One step = the whole batch: for each of `accumulate` micro-batches of batch / accumulate images, the GKL-AT
attack (`attacks.PGD` on `attacks.GKLObjective`: alpha 1, beta 0, 5 steps of eps/2 from x + N(0, 0.001),
eps 8/255, eval mode), the loss CE(model(x), y) + `losses.gkl`(model(x_adv), model(x); alpha 4, beta 20,
`losses.ClassPrior` weights) divided by `accumulate`, its backward and the prior update; then one SGD
step (momentum 0.9, weight decay 5e-4) and zero_grad. Written here from those parts, not the trainer's
own loop. Each configuration (accumulate x activation checkpointing on/off, same initial weights and
data) gets its own model; checkpointing is `models.enable_activation_checkpointing` (training forwards
only: the attack runs in eval mode and is not checkpointed).

Peak memory is the step's own: what it needs above the model, its optimiser state (momentum buffers
allocated up front) and the data.
  cuda  torch.cuda.max_memory_allocated over the timed steps (after reset_peak_memory_stats, once the
        warm-up has run cuDNN's autotuning) minus memory_allocated before them.
  cpu   each configuration in a fresh subprocess: ru_maxrss at the end minus the resident set after
        building the model and data (RSS includes the allocator's slack: compare rows, not to CUDA).
Time: median of the timed steps, and its ratio to accumulate 1 without checkpointing, measured in the
same run. Correctness: the first step's loss on the initial weights with checkpointing must equal the
one without at the same accumulation (fp32: 1e-5 relative; bf16: 1e-2); the script exits 1 otherwise.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from advgkl import attacks, losses
from advgkl.models import create_model, enable_activation_checkpointing

ROOT = Path(__file__).resolve().parents[1]
EPS = 8 / 255
ATTACK_STEPS = 5
GKL = dict(alpha=4.0, beta=20.0, prior_temperature=4.0)
LR = 0.05


def rss_bytes() -> int:
    """Resident set now (Linux /proc); elsewhere the peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return max_rss_bytes()


def max_rss_bytes() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # Linux reports KiB


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def measure(model_name: str, model_kw: dict, batch: int, image: int, accumulate: int, checkpointing: bool,
            device: torch.device, amp: bool, channels_last: bool, warmup: int, repeats: int) -> dict:
    """One configuration: {peak_bytes, step_ms, loss} (loss: the first step's, on the initial weights)."""
    if batch % accumulate:
        raise SystemExit(f"bench_memory: batch {batch} is not divisible by accumulate {accumulate}")
    torch.manual_seed(0)
    model = create_model(model_name, num_classes=10, in_channels=3, **model_kw)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model = model.to(device, memory_format=fmt).train()
    if checkpointing:
        enable_activation_checkpointing(model, model_name)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.SGD(params, lr=LR, momentum=0.9, weight_decay=5e-4, fused=device.type == "cuda")
    for p in params:  # zeros give the same first step as SGD's lazy clone; allocated here, not in the step
        opt.state[p]["momentum_buffer"] = torch.zeros_like(p)
    prior = losses.ClassPrior(10, GKL["prior_temperature"]).to(device)
    g = torch.Generator().manual_seed(0)
    prior.prior = torch.softmax(2 * torch.randn(10, 10, generator=g), 1).to(device)
    x = torch.rand(batch, 3, image, image, generator=g).to(device).contiguous(memory_format=fmt)
    y = torch.randint(0, 10, (batch,), generator=g).to(device)
    dtype = torch.bfloat16 if amp else None
    attack = attacks.PGD(eps=EPS, steps=ATTACK_STEPS, step_size=EPS / 2, random_start="normal",
                         objective=attacks.GKLObjective(prior, alpha=1.0, beta=0.0), amp_dtype=dtype)

    def step() -> float:
        total = 0.0
        for xb, yb in zip(x.chunk(accumulate), y.chunk(accumulate)):
            x_adv = attack(model, xb, yb)
            with torch.autocast(device.type, dtype=dtype, enabled=amp):
                nat, adv = model(xb), model(x_adv)
            w = prior.weights(yb)
            loss = (F.cross_entropy(nat.float(), yb)
                    + losses.gkl(adv.float(), nat.float(), w, alpha=GKL["alpha"], beta=GKL["beta"])) / accumulate
            loss.backward()
            prior.update(nat, yb)
            total += loss.detach()
            del nat, adv, loss, x_adv
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(total)

    gc.collect()
    sync(device)
    base = rss_bytes() if device.type == "cpu" else None
    torch.manual_seed(1)
    first_loss = None
    for _ in range(warmup):
        loss = step()
        first_loss = loss if first_loss is None else first_loss
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        loss = step()
        sync(device)
        times.append(time.perf_counter() - t0)
        first_loss = loss if first_loss is None else first_loss
    peak = (torch.cuda.max_memory_allocated() if device.type == "cuda" else max_rss_bytes()) - base
    return {"peak_bytes": peak, "step_ms": 1e3 * statistics.median(times), "loss": first_loss}


def measure_in_subprocess(spec: dict) -> dict:
    """CPU: one configuration in a fresh interpreter, so ru_maxrss is this configuration's alone."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True,
                          env=env)
    if proc.returncode:
        raise RuntimeError(f"bench_memory child {spec} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def child(spec: dict) -> None:
    if spec["threads"]:
        torch.set_num_threads(spec["threads"])
    args = {k: v for k, v in spec.items() if k != "threads"}
    args["device"] = torch.device(args["device"])
    print(json.dumps(measure(**args)))


def fmt_bytes(n: float) -> str:
    return f"{n / 2**30:.2f}GiB" if abs(n) >= 2**30 else f"{n / 2**20:.1f}MiB"


def run_table(model_name: str, model_kw: dict, batch: int, image: int, accumulates: list[int], device: torch.device,
              amp: bool, channels_last: bool, warmup: int, repeats: int, threads: int = 0, print_fn=print) -> dict:
    """Every (accumulate, checkpointing) configuration; prints the table and returns
    {"rows": {"acc{k}" / "acc{k}+ckpt": {...}}, "failures": [...], "ratio_line": str}."""
    label = model_name + (f"({','.join(f'{k}={v}' for k, v in model_kw.items())})" if model_kw else "")
    w = max(16, len(label))
    print_fn(f"{'model':<{w}} {'batch':>5} {'accum':>5} {'micro':>5} {'ckpt':>4} {'peak_mem':>10} {'mem_ratio':>9} "
             f"{'step_ms':>9} {'time_ratio':>10} {'loss':>10}  check")
    rows, failures, plain_loss = {}, [], {}
    base = None
    for k in accumulates:
        for ckpt in (False, True):
            spec = dict(model_name=model_name, model_kw=model_kw, batch=batch, image=image, accumulate=k,
                        checkpointing=ckpt, device=device.type, amp=amp, channels_last=channels_last,
                        warmup=warmup, repeats=repeats)
            if device.type == "cpu":
                r = measure_in_subprocess({**spec, "threads": threads})
            else:
                try:
                    r = measure(**{**spec, "device": device})
                except torch.cuda.OutOfMemoryError:
                    r = None
                gc.collect()
                torch.cuda.empty_cache()
            key = f"acc{k}{'+ckpt' if ckpt else ''}"
            if r is None:
                rows[key] = None
                print_fn(f"{label:<{w}} {batch:>5} {k:>5} {batch // k:>5} {'on' if ckpt else 'off':>4} {'OOM':>10}")
                continue
            if base is None and k == accumulates[0] and not ckpt:
                base = r
            r["mem_ratio"] = r["peak_bytes"] / base["peak_bytes"] if base else None
            r["time_ratio"] = r["step_ms"] / base["step_ms"] if base else None
            check = ""
            if not ckpt:
                plain_loss[k] = r["loss"]
            elif k in plain_loss:
                rel = abs(r["loss"] - plain_loss[k]) / max(abs(plain_loss[k]), 1e-12)
                tol = 1e-2 if amp else 1e-5
                check = f"loss rel_diff={rel:.1e} tol={tol:g} {'PASS' if rel <= tol else 'FAIL'}"
                if rel > tol:
                    failures.append(f"{label} b{batch} accumulate {k}: checkpointed loss differs by {rel:.1e} "
                                    f"> {tol:g}")
            rows[key] = r
            ratios = (f"{r['mem_ratio']:>8.2f}x {r['step_ms']:>9.1f} {r['time_ratio']:>9.2f}x" if base else
                      f"{'n/a':>9} {r['step_ms']:>9.1f} {'n/a':>10}")
            print_fn(f"{label:<{w}} {batch:>5} {k:>5} {batch // k:>5} {'on' if ckpt else 'off':>4} "
                     f"{fmt_bytes(r['peak_bytes']):>10} {ratios} {r['loss']:>10.5f}  {check}".rstrip())
    parts = [f"{key} mem {r['mem_ratio']:.2f}x time {r['time_ratio']:.2f}x" for key, r in rows.items()
             if r is not None and r["mem_ratio"] is not None and key != f"acc{accumulates[0]}"]
    ratio_line = (f"bench_memory: {label} b{batch} peak-memory and time ratio vs accumulate {accumulates[0]} "
                  f"without checkpointing: {', '.join(parts) or 'n/a'} (device={device.type})")
    return {"rows": rows, "failures": failures, "ratio_line": ratio_line, "label": label}


def parse_kw(items: list[str]) -> dict:
    out = {}
    for item in items:
        key, _, value = item.partition("=")
        try:
            out[key] = int(value)
        except ValueError:
            out[key] = value
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--model", help="registered model (default: cuda wrn_34_10, cpu preact_resnet18; "
                                        "smoke: wrn_34_10 with --model-kw depth=10 width=1)")
    parser.add_argument("--model-kw", nargs="*", default=None, metavar="KEY=VALUE",
                        help="the model's own options, as model.kwargs (e.g. depth=10 width=1)")
    parser.add_argument("--batch", type=int, help="images per step (default: cuda 128, cpu 32; smoke 8)")
    parser.add_argument("--image-size", type=int, help="square images (default 32; smoke 16)")
    parser.add_argument("--accumulate", nargs="+", type=int, help="micro-batches per step (default 1 2 4; smoke 1 4)")
    parser.add_argument("--amp", default="auto", choices=["auto", "none", "bf16"],
                        help="auto: bf16 on CUDA, none on CPU")
    parser.add_argument("--channels-last", default="on", choices=["on", "off"], help="(what runtime's auto picks)")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per configuration")
    parser.add_argument("--repeats", type=int, help="timed steps per configuration, median (default: cuda 3, cpu 1)")
    parser.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's default)")
    parser.add_argument("--smoke", action="store_true",
                        help="WRN-10-1 at batch 8 on 16x16, accumulate 1 and 4, 1 + 1 steps: checks that it runs")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        child(json.loads(args.child))
        return 0
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if args.smoke:
        model, kw, batch, image, repeats = "wrn_34_10", {"depth": 10, "width": 1}, 8, 16, 1
    elif cuda:
        model, kw, batch, image, repeats = "wrn_34_10", {}, 128, 32, 3
    else:
        model, kw, batch, image, repeats = "preact_resnet18", {}, 32, 32, 1
    model = args.model or model
    kw = parse_kw(args.model_kw) if args.model_kw is not None else (kw if not args.model else {})
    batch, image = args.batch or batch, args.image_size or image
    repeats = args.repeats or repeats
    accumulates = args.accumulate or ([1, 4] if args.smoke else [1, 2, 4])
    amp = args.amp == "bf16" or (args.amp == "auto" and cuda)
    if args.threads:
        torch.set_num_threads(args.threads)
    if cuda:
        torch.backends.cudnn.benchmark = True  # what trainers.train does on CUDA
        name = torch.cuda.get_device_name()
    else:
        name = f"cpu ({torch.get_num_threads()} threads)"
    print(f"device={name} torch={torch.__version__} amp={'bf16' if amp else 'none'} channels_last={args.channels_last} "
          f"image={image}x{image} warmup={args.warmup} repeats={repeats} "
          f"peak={'max_memory_allocated' if cuda else 'ru_maxrss - RSS after set-up, one subprocess per row'}")
    out = run_table(model, kw, batch, image, accumulates, device, amp, args.channels_last == "on", args.warmup,
                    repeats, torch.get_num_threads() if not cuda else 0)
    for line in out["failures"]:
        print(f"loss check FAIL: {line}")
    print(out["ratio_line"])
    return 1 if out["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
