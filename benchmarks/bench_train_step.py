"""Images/s of one adversarial training step: a reference-style fp32 baseline vs advgkl's own path.

    python benchmarks/bench_train_step.py --device cuda --peak-tflops 989      # both models, batch 128 and 512
    python benchmarks/bench_train_step.py --device cuda --compile
    python benchmarks/bench_train_step.py --device cpu --models preact_resnet18 --batch-sizes 32 --repeats 2
    python benchmarks/bench_train_step.py --smoke      # tiny_cnn, batch 8, 1 repeat: seconds on CPU

Methods (eps = 8/255, L-inf, CIFAR-shaped random images, one fixed batch resident on the device, so
data loading is not timed; bench_data.py measures that):
  pgd_at  CE attack, 10 steps of 2/255 from a uniform start; loss CE(model(x_adv), y).
  gkl_at  GKL attack (alpha 1, beta 0 for 10 classes / 1 for 100), 5 steps of eps/2 from x + N(0, 0.001);
          loss CE(model(x), y) + GKL(model(x_adv), model(x); alpha 4, beta 20, class-prior weights).
Variants, same initial weights:
  baseline  what reference code does: fp32 eager NCHW (cuDNN's default TF32 convolutions left on), an
            attack loop written here that recomputes the clean forward at every GKL attack step,
            pairwise GKL (`losses.gkl_pairwise`), torch.optim.SGD with its defaults.
  advgkl    the trainer's own step: `trainers.build_state` around the model and `trainers.train_step`
            (the method's loss from `advgkl.methods`, `attacks.PGD` with the clean logits once per attack,
            closed-form GKL, AMP and channels_last as `runtime.amp` / `runtime.channels_last` resolve
            (auto: bf16 + channels_last on CUDA, fp32 channels_last on CPU), `--compile`, fused SGD).
Correctness: both variants' training loss on the same fixed (x, x_adv, y) with the initial weights must
agree within the precision of the advgkl variant (bf16: 5e-2 relative, fp32: 1e-4); the script exits 1
otherwise.
MFU = forward FLOPs per image (`models.model_info`, conv + linear) x forward-equivalent passes per image
/ step time / peak dense bf16 FLOP/s. A backward counts as 2 forwards, also the attack's input-only one:
pgd_at = 10 x 3 (attack) + 1 x 3 (loss) = 33; gkl_at = 5 x 3 (attack) + 1 (clean logits for the attack,
no grad) + 2 x 3 (loss) = 22. Both variants get the same count: the baseline's recomputed clean forwards
are redundant work, not credited. Peak memory: torch.cuda.max_memory_allocated; on CPU n/a.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from advgkl import losses
from advgkl.config import Config, from_dict
from advgkl.models import create_model, model_info
from advgkl.runtime import amp_dtype
from advgkl.trainers import build_state, forward_loss, step_size_at, train_step

EPS = 8 / 255
LR = 0.05  # small enough that a few steps on a random batch never blow up
# method -> attack steps, step size, random start (GKL-AT's published recipe, docs/gkl.md, and Madry et al.'s PGD-AT)
SETTINGS = {"pgd_at": (10, 2 / 255, "uniform"), "gkl_at": (5, EPS / 2, "normal")}
GKL = dict(alpha=4.0, beta=20.0, gamma=1.0, prior_temperature=4.0)
PEAK_BF16_TFLOPS = {"H100": 989.0, "H200": 989.0, "A100": 312.0}  # dense, SXM parts


def forward_passes(method: str) -> int:
    """Forward-equivalent passes per image per step (a backward = 2 forwards); see the module docstring."""
    steps = SETTINGS[method][0]
    return steps * 3 + 3 if method == "pgd_at" else steps * 3 + 1 + 2 * 3


def attack_beta(num_classes: int) -> float:
    return 0.0 if num_classes == 10 else 1.0  # docs/gkl.md#attack-objective: 0 on CIFAR-10, 1 on CIFAR-100


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()  # kernels are asynchronous: wait before reading the clock


# ---------------------------------------------------------------------------------------- baseline
class BaselineStep:
    """Reference-style PGD-AT / GKL-AT step: fp32 eager, clean forward inside every attack step,
    pairwise GKL, plain SGD. ``step(x, y)`` runs attack + loss + update; ``loss(x, x_adv, y)`` alone."""

    def __init__(self, model: nn.Module, method: str, prior: losses.ClassPrior):
        self.model, self.method, self.prior = model, method, prior
        self.steps, self.step_size, self.start = SETTINGS[method]
        self.beta_attack = attack_beta(prior.num_classes)
        self.opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9, weight_decay=5e-4)

    def attack(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        self.model.eval()
        if self.start == "uniform":
            x_adv = (x + torch.empty_like(x).uniform_(-EPS, EPS)).clamp(0, 1)
        else:
            x_adv = x + 0.001 * torch.randn_like(x)
        w = self.prior.weights(y, GKL["gamma"])
        for _ in range(self.steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                if self.method == "pgd_at":
                    loss = F.cross_entropy(self.model(x_adv), y)
                else:  # as in the reference code: model(x) again at every step, with a graph
                    loss = losses.gkl_pairwise(self.model(x_adv), self.model(x), w, alpha=1.0, beta=self.beta_attack)
            (grad,) = torch.autograd.grad(loss, [x_adv])
            x_adv = x_adv.detach() + self.step_size * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - EPS), x + EPS).clamp(0, 1)
        self.model.train()
        return x_adv.detach()

    def loss(self, x, x_adv, y):
        if self.method == "pgd_at":
            return F.cross_entropy(self.model(x_adv), y), None
        nat, adv = self.model(x), self.model(x_adv)
        w = self.prior.weights(y, GKL["gamma"])
        return F.cross_entropy(nat, y) + losses.gkl_pairwise(adv, nat, w, alpha=GKL["alpha"], beta=GKL["beta"]), nat

    def step(self, x, y) -> None:
        x_adv = self.attack(x, y)
        loss, nat = self.loss(x, x_adv, y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        if nat is not None:
            self.prior.update(nat, y)


# ------------------------------------------------------------------------------------------ advgkl
def library_config(method: str, model: str, batch: int, num_classes: int, args) -> Config:
    steps, step_size, _ = SETTINGS[method]
    options = {**GKL, "weights": "prior", "attack_beta": attack_beta(num_classes)} if method == "gkl_at" else {}
    return from_dict({
        "data": {"dataset": "cifar10" if num_classes == 10 else "cifar100", "batch_size": batch},
        "model": {"name": model},
        "method": {"name": method, **options},
        "attack": {"eps": EPS, "steps": steps, "step_size": step_size},
        "optim": {"lr": LR, "momentum": 0.9, "weight_decay": 5e-4},
        "runtime": {"device": args.device, "amp": args.amp, "compile": args.compile,
                    "channels_last": args.channels_last},
    })


class LibraryStep:
    """advgkl's step: ``trainers.build_state`` around the model, then ``trainers.train_step``, the function
    ``trainers.train`` runs (attack, loss under autocast, update, class-prior update)."""

    def __init__(self, model: nn.Module, cfg: Config, prior: losses.ClassPrior, device: torch.device):
        self.state = build_state(cfg, model, device, prior.num_classes)
        if self.state.ctx.prior is not None:  # start from the baseline's prior rows
            self.state.ctx.prior.prior = prior.prior.clone()
        self.step_size = step_size_at(cfg, self.state.method, cfg.attack.eps)

    def loss(self, x, x_adv, y):
        s = self.state
        loss, nat, _ = forward_loss(s, s.nets.train, x.contiguous(memory_format=s.memory_format),
                                    x_adv.contiguous(memory_format=s.memory_format), y)
        return loss, nat

    def step(self, x, y) -> None:
        train_step(self.state, x, y, eps=self.state.cfg.attack.eps, step_size=self.step_size, lr=LR)


# ------------------------------------------------------------------------------------------ timing
@dataclass
class Result:
    images_per_s: float | None = None
    step_ms: float | None = None
    peak_mem_gib: float | None = None
    loss: float | None = None
    note: str = ""


def time_steps(step, x, y, device, warmup: int, repeats: int) -> tuple[float, float | None]:
    """Median step time in ms after warm-up, and the peak CUDA memory of the timed steps in GiB."""
    for _ in range(warmup):
        step(x, y)
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        step(x, y)
        sync(device)
        times.append(time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None
    return 1e3 * statistics.median(times), peak


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def run_case(model_name, method, batch, args, device, num_classes, state, prior_rows,
             variants=("baseline", "advgkl")):
    """Times the variants on one (model, method, batch); returns {variant: Result}.

    "advgkl+compile" is the advgkl variant with torch.compile (its compilation happens in the warm-up)."""
    g = torch.Generator().manual_seed(0)
    x = torch.rand(batch, 3, 32, 32, generator=g).to(device)
    y = torch.randint(0, num_classes, (batch,), generator=g).to(device)
    results, x_adv = {}, None

    def fresh_model():
        model = create_model(model_name, num_classes=num_classes, in_channels=3).to(device)
        model.load_state_dict(state)
        return model

    def fresh_prior():
        prior = losses.ClassPrior(num_classes, GKL["prior_temperature"]).to(device)
        prior.prior = prior_rows.clone()
        return prior

    for variant in variants:
        res = Result()
        try:
            if variant == "baseline":
                runner = BaselineStep(fresh_model(), method, fresh_prior())
                torch.manual_seed(1)
                x_adv = runner.attack(x, y)  # the fixed batch's adversarial images for the loss check
            else:
                compile_ = args.compile or variant == "advgkl+compile"
                cfg = library_config(method, model_name, batch, num_classes, argparse.Namespace(
                    **{**vars(args), "compile": compile_}))
                runner = LibraryStep(fresh_model(), cfg, fresh_prior(), device)
            loss, _ = runner.loss(x, x_adv, y)  # initial weights, same (x, x_adv, y) for both variants
            res.loss = loss.item()
            del loss
            res.step_ms, res.peak_mem_gib = time_steps(runner.step, x, y, device, args.warmup, args.repeats)
            res.images_per_s = batch / (res.step_ms / 1e3)
        except torch.cuda.OutOfMemoryError:
            res.note = "OOM"
        runner = None
        free(device)
        results[variant] = res
        if x_adv is None:
            break  # the baseline could not even attack; nothing to compare against
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    parser.add_argument("--models", nargs="+", help="default: preact_resnet18 wrn_34_10 (smoke: tiny_cnn)")
    parser.add_argument("--batch-sizes", nargs="+", type=int, help="default: 128 512 (smoke: 8)")
    parser.add_argument("--methods", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--num-classes", type=int, default=10, choices=[10, 100])
    parser.add_argument("--amp", default="auto", choices=["auto", "none", "bf16"],
                        help="advgkl variant's runtime.amp (auto: bf16 on CUDA, none on CPU)")
    parser.add_argument("--channels-last", default="auto", choices=["auto", "on", "off"])
    parser.add_argument("--compile", action="store_true", help="torch.compile the advgkl variant's model")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (compile happens here)")
    parser.add_argument("--repeats", type=int, default=5, help="timed steps per variant (median)")
    parser.add_argument("--peak-tflops", type=float, default=None,
                        help="dense bf16 peak for MFU (default: H100/H200 989, A100 312, else MFU n/a)")
    parser.add_argument("--threads", type=int, default=0,
                        help="torch CPU threads (0 = torch default; on a shared box 1 gives steadier timings)")
    parser.add_argument("--smoke", action="store_true",
                        help="1 warm-up + 1 timed step; tiny_cnn, batch 8 unless --models/--batch-sizes are given")
    args = parser.parse_args(argv)
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.smoke:
        args.warmup, args.repeats = 1, 1
    args.models = args.models or (["tiny_cnn"] if args.smoke else ["preact_resnet18", "wrn_34_10"])
    args.batch_sizes = args.batch_sizes or ([8] if args.smoke else [128, 512])
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    peak = args.peak_tflops
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes; both variants (trainers.train does the same)
        name = torch.cuda.get_device_name()
        peak = peak or next((v for k, v in PEAK_BF16_TFLOPS.items() if k in name), None)
    else:
        name, peak = f"cpu ({torch.get_num_threads()} threads)", None
    print(f"device={name} torch={torch.__version__} amp={args.amp} channels_last={args.channels_last} "
          f"compile={args.compile} warmup={args.warmup} repeats={args.repeats} "
          f"peak_bf16_tflops={peak if peak else 'n/a'}")
    print("forward-equivalent passes per image: "
          + ", ".join(f"{m}={forward_passes(m)}" for m in args.methods) + " (backward = 2 forwards)")
    print(f"{'model':<16} {'method':<7} {'batch':>5} {'variant':<8} {'images/s':>9} {'step_ms':>9} "
          f"{'peak_mem':>9} {'MFU':>6} {'loss':>10}  check")

    failures, ratio_lines = [], []
    for model_name in args.models:
        torch.manual_seed(0)
        state = create_model(model_name, num_classes=args.num_classes, in_channels=3).state_dict()
        flops = model_info(model_name, num_classes=args.num_classes, image_shape=(3, 32, 32)).flops
        g = torch.Generator().manual_seed(0)
        prior_rows = torch.softmax(2 * torch.randn(args.num_classes, args.num_classes, generator=g), 1).to(device)
        ratios = []
        for method in args.methods:
            for batch in args.batch_sizes:
                res = run_case(model_name, method, batch, args, device, args.num_classes, state, prior_rows)
                base, lib = res.get("baseline"), res.get("advgkl")
                for variant, r in res.items():
                    check = ""
                    if variant == "advgkl" and base.loss is not None and r.loss is not None:
                        rel = abs(r.loss - base.loss) / max(abs(base.loss), 1e-12)
                        amp = amp_dtype(library_config(method, model_name, batch, args.num_classes, args), device)
                        tol = 5e-2 if amp is not None else 1e-4
                        ok = rel <= tol
                        check = f"rel_diff={rel:.1e} tol={tol:g} {'PASS' if ok else 'FAIL'}"
                        if not ok:
                            failures.append(f"{model_name} {method} b{batch}: loss rel diff {rel:.1e} > {tol:g}")
                    if r.note:
                        print(f"{model_name:<16} {method:<7} {batch:>5} {variant:<8} {r.note:>9}", flush=True)
                        continue
                    mfu = (f"{flops * forward_passes(method) * r.images_per_s / (peak * 1e12):.1%}"
                           if peak else "n/a")
                    mem = f"{r.peak_mem_gib:.2f}GiB" if r.peak_mem_gib is not None else "n/a"
                    print(f"{model_name:<16} {method:<7} {batch:>5} {variant:<8} {r.images_per_s:>9.1f} "
                          f"{r.step_ms:>9.1f} {mem:>9} {mfu:>6} {r.loss:>10.5f}  {check}", flush=True)
                if base and lib and base.images_per_s and lib.images_per_s:
                    ratios.append(f"{method} b{batch} {lib.images_per_s / base.images_per_s:.2f}x")
                else:
                    ratios.append(f"{method} b{batch} n/a (OOM)")
        ratio_lines.append(f"bench_train_step: {model_name} advgkl/baseline images/s ratio "
                           + ", ".join(ratios) + f" (device={args.device})")
    for line in failures:
        print(f"loss check FAIL: {line}")
    for line in ratio_lines:
        print(line)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
