"""``advgkl train | eval | leaderboard | reproduce | export-robustbench``.

User errors (bad recipe, missing data, wrong checkpoint) print one paragraph and exit 2; anything else
is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from .errors import UserError

DESCRIPTION = ("Adversarial training and robustness evaluation: train | eval | leaderboard | reproduce | "
               "export-robustbench. Run 'advgkl COMMAND -h' for a command's options.")
RESUMABLE = {"train", "eval", "reproduce"}  # the commands that take --resume


def _per_attack(results: dict) -> str:
    """``  (clean 0.845 -> apgd-ce 0.645 -> apgd-t 0.63)``: accuracy after each attack; "" without AutoAttack."""
    per_attack = results.get("per_attack_robust_acc") or {}
    if not per_attack:
        return ""
    return "  (" + " -> ".join(f"{name} {acc:.4g}" for name, acc in per_attack.items()) + ")"


def _train(args) -> None:
    from . import distributed
    from .config import load_config
    from .trainers import train

    cfg = load_config(args.recipe, args.overrides)
    out = Path(args.out) if args.out else Path("runs") / cfg.name
    results = train(cfg, out, resume=args.resume)
    if distributed.env_rank() == 0:  # under torchrun every rank returns the results; one line is enough
        print(f"results: {out / 'results.json'}  clean_acc={results['clean_acc']:.4f}  "
              f"autoattack_acc={results['autoattack_acc']}{_per_attack(results)}")


def _eval(args) -> None:
    from . import distributed
    from .evaluate import evaluate_checkpoint

    results = evaluate_checkpoint(args.checkpoint, out=args.out, n_examples=args.n_examples,
                                  version=args.version, attacks=args.attacks, batch_size=args.batch_size,
                                  device=args.device, wandb=args.wandb, data_root=args.data_root,
                                  resume=args.resume)
    if distributed.env_rank() == 0:
        print(f"results: {Path(results['out']) / 'results.json'}  clean_acc={results['clean_acc']:.4f}  "
              f"autoattack_acc={results['autoattack_acc']}{_per_attack(results)}")


class _Parser(argparse.ArgumentParser):
    """argparse with one clearer message: a missing recipe is named as such."""

    def error(self, message):
        required = "the following arguments are required: "
        if message.startswith(required) and "recipe" in message[len(required):].split(", "):
            message = ("the recipe is missing: give a YAML recipe, e.g. "
                       "advgkl train experiments/recipes/fmnist_gkl_demo.yaml")
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    from .attacks import AA_VERSIONS
    from .logging import WANDB_MODES

    parser = _Parser(prog="advgkl", description=DESCRIPTION)
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    parser.subcommands = sub.choices  # name -> subparser: main() reports unknown flags on the right one

    p = sub.add_parser("train", help="train a model from a YAML recipe, then evaluate it with AutoAttack")
    p.add_argument("recipe", help="YAML recipe, e.g. experiments/recipes/fmnist_gkl_demo.yaml")
    p.add_argument("overrides", nargs="*", default=[],
                   help="dotted overrides, e.g. optim.epochs=2 data.subset=2000")
    p.add_argument("--out", help="run folder (default runs/<name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="clean + AutoAttack accuracy of a saved checkpoint")
    p.add_argument("checkpoint", help="an advgkl checkpoint, e.g. runs/<name>/checkpoints/final.pt")
    p.add_argument("--out", help="output folder (default <run>/eval_<checkpoint>)")
    p.add_argument("--n-examples", type=int, help="first N test points (0 = all)")
    p.add_argument("--version", choices=[*AA_VERSIONS, "none"])
    p.add_argument("--attacks", nargs="+", help="with --version custom, e.g. apgd-ce apgd-t")
    p.add_argument("--batch-size", type=int)
    p.add_argument("--device", default="auto")
    p.add_argument("--data-root", help="dataset folder (default: the checkpoint's data.root)")
    p.add_argument("--wandb", default="offline", choices=WANDB_MODES)
    p.add_argument("--resume", action="store_true", help="continue an interrupted evaluation in --out")
    p.set_defaults(func=_eval)

    try:
        from .robustbench_io import register_cli
    except ImportError:  # robustbench commands are optional: the rest works without robustbench
        pass
    else:
        register_cli(sub)
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args, unknown = parser.parse_known_args(argv)
    if args.command == "train":  # overrides written after an option (`--out DIR optim.lr=0.1`) still count
        args.overrides += [u for u in unknown if "=" in u and not u.startswith("-")]
        unknown = [u for u in unknown if u not in args.overrides]
    if unknown:  # argparse would blame the top-level parser and print its usage: name the subcommand's
        hint = ("; recipe settings are dotted overrides after the recipe, e.g. optim.epochs=2"
                if args.command == "train" and any(u.startswith("--") for u in unknown) else "")
        parser.subcommands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    try:
        args.func(args)
    except UserError as e:
        env = os.environ  # under torchrun, say which process failed
        where = f" (rank {env['RANK']} of {env['WORLD_SIZE']})" if {"RANK", "WORLD_SIZE"} <= env.keys() else ""
        print(f"advgkl {args.command}{where}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        advice = "; rerun with --resume to continue" if args.command in RESUMABLE else ""
        print(f"advgkl {args.command}: interrupted{advice}", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
