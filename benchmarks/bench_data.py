"""Throughput of `BatchLoader` on CIFAR-shaped random uint8 data (no dataset files needed).

    python benchmarks/bench_data.py --device cuda --n 50000 --batch-size 512
    python benchmarks/bench_data.py --smoke          # tiny sizes, a few seconds on CPU

Prints one line per case and a final ratio line (crop_flip vs no augmentation).
"""

from __future__ import annotations

import argparse
import time

import torch

from advgkl.data import BatchLoader


def images_per_second(loader: BatchLoader, device: torch.device, epochs: int) -> float:
    next(iter(loader))  # warm-up: first-call allocations and kernel selection are not throughput
    loader.set_epoch(1)
    if device.type == "cuda":
        torch.cuda.synchronize()
    start, seen = time.perf_counter(), 0
    for _ in range(epochs):
        for x, _ in loader:
            seen += len(x)
    if device.type == "cuda":
        torch.cuda.synchronize()  # kernels are asynchronous: wait before reading the clock
    return seen / (time.perf_counter() - start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--n", type=int, default=50_000, help="real images (CIFAR-10 train size by default)")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--smoke", action="store_true", help="n=2048, batch 256: checks that it runs")
    args = parser.parse_args(argv)
    if args.smoke:
        args.n, args.batch_size = 2048, 256
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda but CUDA is not available")
    device = torch.device(args.device)

    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (args.n, 3, 32, 32), dtype=torch.uint8, generator=g)
    labels = torch.randint(0, 10, (args.n,), generator=g)
    generated = (torch.randint(0, 256, (args.n, 3, 32, 32), dtype=torch.uint8, generator=g), labels.clone())
    cases = {
        "none": dict(augment="none"),
        "crop_flip": dict(augment="crop_flip"),
        "crop_flip+gen0.3": dict(augment="crop_flip", generated=generated, generated_ratio=0.3),
    }
    rates = {}
    for name, kw in cases.items():
        loader = BatchLoader(images, labels, args.batch_size, device=device, seed=0, **kw)
        rates[name] = images_per_second(loader, device, args.epochs)
        print(f"case={name} device={args.device} n={args.n} batch={args.batch_size} "
              f"images/s={rates[name]:,.0f}", flush=True)
    print(f"bench_data: crop_flip/none throughput ratio = {rates['crop_flip'] / rates['none']:.3f} "
          f"(device={args.device}, crop_flip {rates['crop_flip']:,.0f} images/s)")


if __name__ == "__main__":
    main()
