"""How far one bf16 GKL-AT training step is from the same step in fp32 (issue 16, item 4; docs/fidelity.md row 5).

    python benchmarks/bench_bf16_gradients.py [--model wrn_28_10 --depth 16 --width 4] [--batch 128] [--smoke]

Both steps start from the same weights, batch and random stream, through advgkl's own ``train_step``:
the 5-step GKL attack and the loss run under bf16 autocast in one and in fp32 in the other, so the
difference includes the attack finding other adversarial images. Reported: the relative L2 distance of
the weight gradients, their cosine, the worst layer, the loss difference and the share of adversarial
pixels that differ. Real Fashion-MNIST images (the study's data, 28x28).
The last line is the ratio line: the bf16 step's distance from the fp32 step over the distance between
two fp32 steps whose attacks start from different random draws (the spread the algorithm has anyway),
measured side by side.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from advgkl import distributed, trainers  # noqa: E402
from advgkl.config import from_dict  # noqa: E402


def recipe(args, amp: str):
    return from_dict({
        "data": {"dataset": "fashion_mnist", "subset": args.batch, "batch_size": args.batch},
        "model": {"name": args.model, "kwargs": {"depth": args.depth, "width": args.width}},
        "method": {"name": "gkl_at", "alpha": 4.0, "beta": 20.0, "gamma": 1.0, "prior_temperature": 4.0},
        "attack": {"eps": 0.1, "steps": args.steps},
        "optim": {"epochs": 1, "lr": 0.1},
        "eval": {"version": "none"}, "logging": {"wandb": "disabled", "progress": False},
        "runtime": {"amp": amp, "threads": args.threads, "channels_last": "off", "seed": 0},
    })


def one_step(args, amp: str, start_seed: int = 1):
    """Gradients, loss and adversarial batch of the first training step under ``amp``; ``start_seed``
    seeds the attack's random start."""
    cfg = recipe(args, amp)
    s = trainers.build(cfg, distributed.current())
    x, y = next(iter(s.loader))
    captured = {}
    attack = s.attack

    def keep(*a, **kw):  # remember the adversarial images the attack returns
        captured["x_adv"] = attack(*a, **kw)
        return captured["x_adv"]

    s.attack = keep
    torch.manual_seed(start_seed)
    loss, _, _ = trainers.train_step(s, x, y, eps=cfg.attack.eps, step_size=cfg.attack.eps / 2, lr=cfg.optim.lr)
    grads = {n: p.grad.detach().double().clone() for n, p in s.model.named_parameters()}
    return grads, float(loss), captured["x_adv"]


def distance(a: dict, b: dict):
    flat = lambda g: torch.cat([v.flatten() for v in g.values()])  # noqa: E731
    fa, fb = flat(a), flat(b)
    rel = ((fa - fb).norm() / fb.norm()).item()
    cos = torch.nn.functional.cosine_similarity(fa, fb, dim=0).item()
    worst = max(a, key=lambda n: ((a[n] - b[n]).norm() / (b[n].norm() + 1e-30)).item())
    worst_rel = ((a[worst] - b[worst]).norm() / (b[worst].norm() + 1e-30)).item()
    return rel, cos, worst, worst_rel


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="wrn_28_10")
    p.add_argument("--depth", type=int, default=16)
    p.add_argument("--width", type=int, default=4)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--smoke", action="store_true", help="WRN-10-1, batch 16: seconds")
    args = p.parse_args(argv)
    if args.smoke:
        args.depth, args.width, args.batch = 10, 1, 16
    torch.set_num_threads(args.threads)
    fp32, loss32, adv32 = one_step(args, "none")
    other, loss_other, adv_other = one_step(args, "none", start_seed=2)
    bf16, loss16, adv16 = one_step(args, "bf16")
    rel, cos, worst, worst_rel = distance(bf16, fp32)
    floor, floor_cos, _, _ = distance(other, fp32)
    changed, changed_other = (adv16 != adv32).float().mean().item(), (adv_other != adv32).float().mean().item()
    print(f"model {args.model} depth {args.depth} width {args.width}, batch {args.batch}, {args.steps}-step GKL attack, "
          f"alpha 4 beta 20, torch {torch.__version__}, CPU")
    print(f"bf16 vs fp32: gradient relative L2 {rel:.3e}, cosine {cos:.6f}, worst layer {worst} {worst_rel:.3e}, "
          f"loss {loss16:.6f} vs {loss32:.6f}, adversarial pixels differing {changed:.1%}")
    print(f"fp32, another random start: gradient relative L2 {floor:.3e}, cosine {floor_cos:.6f}, "
          f"loss {loss_other:.6f}, adversarial pixels differing {changed_other:.1%}")
    print(f"bench_bf16_gradients: bf16 gradient distance {rel:.3e}, random-start spread {floor:.3e}, "
          f"ratio {rel / max(floor, 1e-30):.3g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
