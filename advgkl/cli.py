"""``advgkl train | eval | leaderboard | reproduce | export-robustbench | sweep | summarize``.

User errors (bad recipe, missing data, wrong checkpoint) print one paragraph and exit 2; anything else
is a bug and keeps its traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path

from .errors import UserError

DESCRIPTION = ("Adversarial training and robustness evaluation: train | eval | leaderboard | reproduce | "
               "export-robustbench | sweep | summarize. Run 'advgkl COMMAND -h' for a command's options.")
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


def _sweep(args) -> int:
    from .sweep import Resources, launch, parse_grid, plan

    recipes = [r for r in args.recipes if "=" not in r]
    overrides = [r for r in args.recipes if "=" in r]
    if not recipes:
        raise UserError("the recipe is missing: give one or more YAML recipes, merged in order")
    for flag in ("parallel", "nodes", "tasks_per_node"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} {getattr(args, flag)}: must be at least 1")
    if args.gpus_per_node < 0 or args.gpus_per_node % args.tasks_per_node:
        raise UserError(f"--gpus-per-node {args.gpus_per_node} must be a multiple of --tasks-per-node "
                        f"{args.tasks_per_node} (each task runs torchrun on its share of the GPUs)")
    if args.executor == "local" and (args.nodes > 1 or args.tasks_per_node > 1):
        raise UserError("--executor local runs on one machine: --nodes and --tasks-per-node need --executor slurm")
    out = Path(args.out) if args.out else Path("sweeps") / Path(recipes[-1]).stem
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder")
    specs = plan(recipes, overrides, parse_grid(args.grid), args.seeds, out, variants=args.variants,
                 teacher=args.teacher, aa_points=args.aa_points, pgd20_full=args.pgd20_full)
    if args.dry_run:
        for spec in specs:
            print(f"{spec['name']}: advgkl train {spec['recipe']} {' '.join(spec['overrides'])} --out {spec['dir']}")
        return 0
    threads = args.cpus_per_task or (max(1, (os.cpu_count() or 1) // args.parallel) if args.executor == "local" else 0)
    res = Resources(parallel=args.parallel, threads=threads, gpus_per_node=args.gpus_per_node, nodes=args.nodes,
                    tasks_per_node=args.tasks_per_node)
    slurm = {"partition": args.partition, "time": args.time, "setup": args.setup or []}
    return launch(specs, out, executor=args.executor, res=res, slurm=slurm, max_requeue=args.max_requeue,
                  command=["advgkl", *args.argv])


def _summarize(args) -> None:
    from .summarize import DEFAULT_COLUMNS, summarize

    done = summarize([Path(d) for d in args.dirs], md=args.md, csv_path=args.csv, png=args.png,
                     columns=args.columns or DEFAULT_COLUMNS, with_footnote=not args.no_footnote)
    print(done["markdown"], end="")
    if done["unfinished"]:
        print(f"not finished (no results.json), left out: {', '.join(done['unfinished'])}")
    for what, path in (("markdown", args.md), ("csv", args.csv), ("plot", args.png)):
        if path:
            print(f"{what}: {path}")


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

    p = sub.add_parser("sweep", help="train a grid of runs over seeds, here or on a SLURM cluster (docs/sweep.md)")
    p.add_argument("recipes", nargs="+", metavar="RECIPE.yaml|key=value",
                   help="recipes merged in order, then dotted overrides for every run")
    p.add_argument("--variants", nargs="+", default=[], metavar="RECIPE.yaml",
                   help="alternative recipes merged on top in turn, each naming its runs, e.g. pgd_at.yaml trades.yaml")
    p.add_argument("--grid", nargs="+", action="extend", default=[], metavar="KEY=V1,V2",
                   help="an axis of the grid, e.g. method.beta=3,6")
    p.add_argument("--seeds", nargs="+", type=int, default=[0])
    p.add_argument("--executor", choices=["local", "slurm"], default="local")
    p.add_argument("--parallel", type=int, default=1,
                   help="runs at once (local: each gets its share of the CPU threads; slurm: array parallelism)")
    p.add_argument("--out", help="sweep folder: runs/<name>/, sweep.json, logs/ (default sweeps/<recipe>)")
    p.add_argument("--aa-points", type=int, default=0,
                   help="also standard AutoAttack on the first N test points where a run used fewer")
    p.add_argument("--pgd20-full", action="store_true", help="also PGD-20 on the whole test set (pgd20_full.json)")
    p.add_argument("--teacher", help="teacher checkpoint of the runs whose method distils one")
    p.add_argument("--max-requeue", type=int, default=3, help="requeues of a preempted run")
    p.add_argument("--dry-run", action="store_true", help="list the runs and their commands; start nothing")
    g = p.add_argument_group("SLURM (--executor slurm)")
    g.add_argument("--partition")
    g.add_argument("--time", type=int, default=24 * 60, help="minutes per job")
    g.add_argument("--gpus-per-node", type=int, default=0, help="more than one: the job runs torchrun")
    g.add_argument("--nodes", type=int, default=1)
    g.add_argument("--tasks-per-node", type=int, default=1, help="torchrun launchers per node")
    g.add_argument("--cpus-per-task", type=int, default=0)
    g.add_argument("--setup", nargs="+", action="extend",
                   help="shell lines run before each job, e.g. 'module load cuda'")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("summarize", help="one table over run folders, seeds collapsed: Markdown, CSV, plot")
    p.add_argument("dirs", nargs="+", help="run folders, or folders holding them (directly or in runs/)")
    p.add_argument("--md", help="write the markdown table here (e.g. summary.md)")
    p.add_argument("--csv", help="write one row per run here (e.g. summary.csv)")
    p.add_argument("--png", help="write the bar plot here (e.g. summary.png)")
    p.add_argument("--columns", nargs="+", help="table columns, in order (default: all)")
    p.add_argument("--no-footnote", action="store_true", help="the table alone, without the note on its numbers")
    p.set_defaults(func=_summarize)

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
    args.argv = list(sys.argv[1:] if argv is None else argv)  # what sweep.json records as its command
    if args.command == "train":  # overrides written after an option (`--out DIR optim.lr=0.1`) still count
        args.overrides += [u for u in unknown if "=" in u and not u.startswith("-")]
        unknown = [u for u in unknown if u not in args.overrides]
    if unknown:  # argparse would blame the top-level parser and print its usage: name the subcommand's
        hint = ("; recipe settings are dotted overrides after the recipe, e.g. optim.epochs=2"
                if args.command == "train" and any(u.startswith("--") for u in unknown) else "")
        parser.subcommands[args.command].error(f"unrecognized arguments: {' '.join(unknown)}{hint}")
    from . import preemption

    try:
        with preemption.watch() if args.command in ("train", "eval") else contextlib.nullcontext():
            status = args.func(args)
    except preemption.Preempted as e:  # the state is saved: exit with the status the sweep requeues on
        print(f"advgkl {args.command}: preempted by {e}; rerun with --resume to continue", file=sys.stderr)
        return preemption.PREEMPTED_EXIT
    except UserError as e:
        env = os.environ  # under torchrun, say which process failed
        where = f" (rank {env['RANK']} of {env['WORLD_SIZE']})" if {"RANK", "WORLD_SIZE"} <= env.keys() else ""
        print(f"advgkl {args.command}{where}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        advice = "; rerun with --resume to continue" if args.command in RESUMABLE else ""
        print(f"advgkl {args.command}: interrupted{advice}", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
