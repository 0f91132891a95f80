"""GKL closed form (`losses.gkl`, O(B*C)) vs the pairwise definition (`losses.gkl_pairwise`, O(B*C^2)).

    python benchmarks/bench_losses.py                 # CPU, (128, 10), (128, 100), (256, 1000)
    python benchmarks/bench_losses.py --device cuda
    python benchmarks/bench_losses.py --smoke         # tiny sizes, a second or two; targets not enforced

Times forward + backward (gradients into both logit tensors, alpha = 4, beta = 20, class-prior weights
with gamma = 0.4) and reports the median over repeats after warm-up. Acceptance targets: pairwise /
closed >= 5x at C=100 and >= 100x at C=1000; the script exits 1 when one is missed (not with --smoke).
The pairwise form at (256, 1000) builds several [256, 1000, 1000] float32 tensors: ~5 GB of memory.
CPU runs use one thread unless --threads says otherwise (0 = torch's default).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

import torch

from advgkl import losses

CASES = [(128, 10), (128, 100), (256, 1000)]
SMOKE_CASES = [(8, 10), (8, 100)]
TARGETS = {100: 5.0, 1000: 100.0}  # num_classes -> minimal pairwise/closed time ratio


def make_inputs(b: int, c: int, device: torch.device, seed: int = 0):
    """Student/teacher logits [B, C] (requiring grad) and prior weights prior[y] ** 0.4 [B, C]."""
    g = torch.Generator().manual_seed(seed)
    student = (3 * torch.randn(b, c, generator=g)).to(device).requires_grad_()
    teacher = (3 * torch.randn(b, c, generator=g)).to(device).requires_grad_()
    prior = torch.softmax(2 * torch.randn(c, c, generator=g), dim=1)  # a peaked, row-normalised prior
    y = torch.randint(0, c, (b,), generator=g)
    return student, teacher, prior[y].pow(0.4).to(device)


def time_fwd_bwd(fn, student, teacher, weights, *, warmup: int, repeats: int, budget_s: float):
    """Median milliseconds of loss = fn(...); loss.backward(); stops early once budget_s is spent
    (after at least 3 timed repeats) so the slow pairwise case stays bounded. Returns (ms, loss)."""
    cuda = student.device.type == "cuda"

    def once():
        student.grad = teacher.grad = None
        loss = fn(student, teacher, weights, alpha=4.0, beta=20.0)
        loss.backward()
        if cuda:
            torch.cuda.synchronize()  # kernels are asynchronous: wait before reading the clock
        return loss

    for _ in range(warmup):
        loss = once()
    times, start = [], time.perf_counter()
    for i in range(repeats):
        t0 = time.perf_counter()
        loss = once()
        times.append(time.perf_counter() - t0)
        if i + 1 >= min(3, repeats) and time.perf_counter() - start > budget_s:
            break
    return 1e3 * statistics.median(times), loss.item()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--repeats", type=int, default=20, help="timed repeats per form and case (median)")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget-s", type=float, default=10.0, help="stop repeating a form after this long")
    # One thread by default: [B, C] tensors are too small to split, and on a shared box extra OpenMP
    # threads waiting for a core turned 0.2 ms steps into 48 ms ones.
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch default)")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, 1 warm-up, 2 repeats, no targets")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    if args.threads:
        torch.set_num_threads(args.threads)
    cases = SMOKE_CASES if args.smoke else CASES
    if args.smoke:
        args.warmup, args.repeats = 1, 2
    device = torch.device(args.device)

    print(f"device={args.device} threads={torch.get_num_threads()} torch={torch.__version__} "
          f"(forward+backward, median of up to {args.repeats} after {args.warmup} warm-up)")
    print(f"{'B':>5} {'C':>5} {'closed_ms':>10} {'pairwise_ms':>12} {'speedup':>9} {'rel_diff':>9}  target")
    speedups, failed = {}, []
    for b, c in cases:
        inputs = make_inputs(b, c, device)
        kw = dict(warmup=args.warmup, repeats=args.repeats, budget_s=args.budget_s)
        closed_ms, closed_loss = time_fwd_bwd(losses.gkl, *inputs, **kw)
        pairwise_ms, pairwise_loss = time_fwd_bwd(losses.gkl_pairwise, *inputs, **kw)
        speedup = pairwise_ms / closed_ms
        speedups[c] = speedup
        rel = abs(closed_loss - pairwise_loss) / max(abs(pairwise_loss), 1e-12)  # float32: ~1e-6 expected
        target = TARGETS.get(c)
        if target is None:
            verdict = "-"
        elif args.smoke:
            verdict = f">={target:g}x not checked (smoke)"
        else:
            ok = speedup >= target
            verdict = f">={target:g}x {'PASS' if ok else 'FAIL'}"
            if not ok:
                failed.append(f"C={c}: {speedup:.1f}x < {target:g}x")
        print(f"{b:>5} {c:>5} {closed_ms:>10.3f} {pairwise_ms:>12.3f} {speedup:>8.1f}x {rel:>9.1e}  {verdict}",
              flush=True)
        del inputs
    status = "smoke, targets not checked" if args.smoke else ("FAIL: " + "; ".join(failed) if failed else "PASS")
    ratios = ", ".join(f"C={c} {s:.1f}x" for c, s in speedups.items())
    print(f"bench_losses: pairwise/closed time ratio {ratios} (device={args.device}) {status}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
