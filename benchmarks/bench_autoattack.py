"""Throughput of plain `pyautoattack` run_standard_evaluation vs advgkl's `AutoAttack` on the same points.

    python benchmarks/bench_autoattack.py --smoke     # tiny_cnn, 16 Fashion-MNIST points, APGD-CE only: seconds on CPU
    python benchmarks/bench_autoattack.py --model small_cnn --n 1000 --device cuda --version standard
    python benchmarks/bench_autoattack.py --model preact_resnet18 --dataset cifar10 --checkpoint ckpt.pt --device cuda

The model is trained for --train-steps Adam steps on the training split (a robust-looking evaluation
needs points that survive the first attack) unless --checkpoint gives a state_dict. Both runs use
the same seed, chunk size and fp32 without TF32 (cuDNN deterministic), so their robust accuracies must
be equal: the script exits non-zero otherwise (and reports whether every point agrees). A third case runs
advgkl's AutoAttack on the same weights in channels_last (what `advgkl eval` and training jobs use): its
convolutions round differently, so a point on the edge may flip; the agreement with NCHW is printed.
Prints one line per case and a final ratio line (advgkl / pyautoattack, and channels_last / NCHW).
"""

from __future__ import annotations

import argparse
import copy
import sys
import time

import torch
import torch.nn.functional as F

from advgkl.attacks import AA_ATTACKS, AutoAttack
from advgkl.data import DEFAULT_ROOT, dataset_info, load_dataset
from advgkl.models import create_model


def train_quickly(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int,
                  device: torch.device) -> None:
    """Adam, batch 128, plain CE: enough for a non-trivial evaluation, not a benchmark of training."""
    gen = torch.Generator().manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(images), (128,), generator=gen)
        x, y = (images[idx].float() / 255).to(device), labels[idx].to(device)
        loss = F.cross_entropy(model(x), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    model.eval().zero_grad(set_to_none=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small_cnn")
    parser.add_argument("--dataset", default="fashion_mnist")
    parser.add_argument("--root", default=str(DEFAULT_ROOT))
    parser.add_argument("--checkpoint", default=None, help="state_dict for --model (skips training)")
    parser.add_argument("--train-steps", type=int, default=500)
    parser.add_argument("--n", type=int, default=1000, help="test points (the first n of the test split)")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--version", default="standard", choices=["standard", "plus", "fast", "custom"])
    parser.add_argument("--attacks", default="apgd-ce", help=f"comma list for --version custom, out of {AA_ATTACKS}")
    parser.add_argument("--norm", default="Linf", choices=["Linf", "L2"])
    parser.add_argument("--eps", type=float, default=None, help="default 0.1 (Linf) / 1.0 (L2) on Fashion-MNIST, "
                        "8/255 / 0.5 on CIFAR")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=1, help="runs per case, interleaved; the fastest counts")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--smoke", action="store_true", help="tiny_cnn, n=16, APGD-CE only, 1 thread: checks that it runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.model, args.dataset, args.n, args.train_steps = "tiny_cnn", "fashion_mnist", 16, 150
        args.version, args.attacks, args.batch_size, args.threads = "custom", "apgd-ce", 8, 1
    if args.threads:
        torch.set_num_threads(args.threads)  # on a shared CPU box, more threads than free cores runs ~10x slower
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    device = torch.device(args.device)
    if args.eps is None:
        small = args.dataset in ("fashion_mnist", "mnist")
        args.eps = (0.1 if small else 8 / 255) if args.norm == "Linf" else (1.0 if small else 0.5)

    info = dataset_info(args.dataset)
    torch.manual_seed(0)  # same weights every run: the numbers are comparable across runs
    model = create_model(args.model, num_classes=info.num_classes, in_channels=info.image_shape[0],
                         mean=info.mean, std=info.std).to(device)
    if args.checkpoint:
        model.load_state_dict(torch.load(args.checkpoint, map_location=device, weights_only=True))
    else:
        train_quickly(model, *load_dataset(args.dataset, args.root, train=True), args.train_steps, device)
    model.eval()
    images, labels = load_dataset(args.dataset, args.root, train=False)
    x, y = (images[: args.n].float() / 255).to(device), labels[: args.n].to(device)

    attacks = args.attacks.split(",") if args.version == "custom" else None
    tag = (f"model={args.model} dataset={args.dataset} n={args.n} device={args.device} version={args.version!r} "
           f"norm={args.norm} eps={args.eps:.4g} batch={args.batch_size}")
    out = compare(model, x, y, info.num_classes, norm=args.norm, eps=args.eps, version=args.version,
                  attacks=attacks, batch_size=args.batch_size, device=device, repeat=args.repeat, tag=tag)
    if not out["same_robust_acc"]:
        sys.exit("robust accuracy differs between advgkl's AutoAttack and plain pyautoattack")


def compare(model, x, y, num_classes: int, *, norm: str, eps: float, version: str, attacks, batch_size: int,
            device: torch.device, repeat: int = 1, tag: str = "", print_fn=print) -> dict:
    """Plain pyautoattack, advgkl's AutoAttack (NCHW) and advgkl's AutoAttack in channels_last on the same
    points and weights; prints one line per case and the ratio line, returns the numbers."""
    ours = AutoAttack(model, norm=norm, eps=eps, version=version, attacks=attacks,
                      batch_size=batch_size, seed=0, device=device, progress=False)
    # plain pyautoattack under the same numerics as ours: fp32 convolutions and matmuls, no TF32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.deterministic = True  # run-to-run identical conv gradients, so the two runs can agree
    with torch.no_grad():
        model(x[:batch_size])  # warm-up: first-call allocations and kernel selection are not throughput
    tag = f"{tag} attacks={','.join(ours.attacks)}"
    n = len(x)

    # the same weights in channels_last, as `advgkl eval` and the training jobs run them (runtime.channels_last)
    cl_model = copy.deepcopy(model).to(memory_format=torch.channels_last)
    ours_cl = AutoAttack(cl_model, norm=norm, eps=eps, version=version, attacks=attacks,
                         batch_size=batch_size, seed=0, device=device, progress=False)
    plain_s = ours_s = plain_cpu = ours_cpu = cl_s = float("inf")
    for _ in range(repeat):  # interleaved, so a burst of load elsewhere hits every case alike
        plain = ours.pyautoattack(num_classes)  # fresh: pyautoattack mutates its attack objects
        plain.verbose = False
        start, cpu = time.perf_counter(), time.process_time()  # CPU seconds: steadier on a shared box
        _, y_adv = plain.run_standard_evaluation(x, y, batch_size=batch_size)
        plain_s, plain_cpu = min(plain_s, time.perf_counter() - start), min(plain_cpu, time.process_time() - cpu)
        start, cpu = time.perf_counter(), time.process_time()
        res = ours(x, y)
        ours_s, ours_cpu = min(ours_s, time.perf_counter() - start), min(ours_cpu, time.process_time() - cpu)
        start = time.perf_counter()
        res_cl = ours_cl(x, y)
        cl_s = min(cl_s, time.perf_counter() - start)
    plain_robust = (y_adv == y).cpu()
    print_fn(f"case=pyautoattack {tag} robust_acc={plain_robust.float().mean():.4f} "
             f"wall_s={plain_s:.2f} cpu_s={plain_cpu:.2f} images/s={n / plain_s:,.1f}")
    print_fn(f"case=advgkl {tag} clean_acc={res.clean_acc:.4f} robust_acc={res.robust_acc:.4f} "
             f"wall_s={ours_s:.2f} cpu_s={ours_cpu:.2f} images/s={n / ours_s:,.1f} "
             f"per_attack={res.per_attack_robust_acc}")
    agree = (res_cl.robust_correct == res.robust_correct).float().mean().item()
    print_fn(f"case=advgkl+channels_last {tag} robust_acc={res_cl.robust_acc:.4f} wall_s={cl_s:.2f} "
             f"images/s={n / cl_s:,.1f} per-point agreement with NCHW={agree:.4f}")
    same = torch.equal(res.robust_correct, plain_robust)
    plain_acc = plain_robust.sum().item() / n
    print_fn(f"bench_autoattack: advgkl/pyautoattack throughput ratio = {plain_s / ours_s:.3f} "
             f"(robust accuracy {res.robust_acc:.4f} vs {plain_acc:.4f}, per-point equal: {same}); "
             f"channels_last/NCHW ratio = {ours_s / cl_s:.3f}")
    return {"n": n, "clean_acc": res.clean_acc, "robust_acc": res.robust_acc, "plain_robust_acc": plain_acc,
            "plain_s": plain_s, "advgkl_s": ours_s, "advgkl_channels_last_s": cl_s, "ratio": plain_s / ours_s,
            "ratio_channels_last": plain_s / cl_s, "per_point_equal": same, "same_robust_acc": res.robust_acc == plain_acc,
            "channels_last_agreement": agree}


if __name__ == "__main__":
    main()
