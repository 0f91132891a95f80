"""``advgkl leaderboard | reproduce | export-robustbench``: argparse wiring onto the other modules."""
from __future__ import annotations

import argparse
import json
import re

from ..logging import WANDB_MODES
from .board import format_leaderboard, leaderboard, supported
from .export import export_robustbench
from .reproduction import reproduce


def _dataset_args(p) -> None:
    p.add_argument("--dataset", default="cifar10", choices=sorted({d for d, _ in supported()}))
    p.add_argument("--threat-model", default="Linf", choices=sorted({t for _, t in supported()}))


def _cmd_leaderboard(args) -> None:
    rows = leaderboard(args.dataset, args.threat_model)
    if args.grep:
        pattern = re.compile(re.escape(args.grep), re.I)
        rows = [r for r in rows if pattern.search(" ".join(str(r.get(k, "")) for k in
                                                           ("model_name", "architecture", "name", "authors")))]
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no {args.dataset} {args.threat_model} entries match {args.grep!r}")
    else:
        print(format_leaderboard(rows))


def _cmd_reproduce(args) -> None:
    reproduce(args.name, args.dataset, args.threat_model, n_examples=args.n_examples, model_dir=args.model_dir,
              data_dir=args.data_dir, out_dir=args.out, batch_size=args.batch_size, device=args.device,
              wandb=args.wandb, version=args.version, attacks=args.attacks, seed=args.seed,
              download=not args.offline, progress=not args.no_progress, resume=args.resume)


def _cmd_export(args) -> None:
    export_robustbench(args.run_dir, name=args.name, out_dir=args.out, architecture=args.architecture,
                       link=args.link, paper_title=args.paper_title, authors=args.authors, venue=args.venue,
                       footnote=args.footnote, additional_data=args.additional_data)


def register_cli(subparsers) -> None:
    """Adds ``leaderboard``, ``reproduce`` and ``export-robustbench`` to an argparse subparsers object."""
    _add_leaderboard(subparsers)
    _add_reproduce(subparsers)
    _add_export(subparsers)


def _add_leaderboard(subparsers) -> None:
    p = subparsers.add_parser("leaderboard", help="list RobustBench leaderboard entries (shipped metadata)",
                              description="List RobustBench entries: name, architecture, clean and AutoAttack "
                                          "accuracy (%), extra data; sorted by AutoAttack accuracy.")
    _dataset_args(p)
    p.add_argument("--grep", default=None, help="case-insensitive substring of name, architecture, paper or authors")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON instead of a table")
    p.set_defaults(func=_cmd_leaderboard)


def _add_reproduce(subparsers) -> None:
    from advgkl.attacks import AA_VERSIONS

    p = subparsers.add_parser("reproduce", help="check a leaderboard entry's claimed clean and AutoAttack accuracy",
                              description="Load a RobustBench checkpoint, measure clean and AutoAttack accuracy "
                                          "with the leaderboard's eps on the first N test points and compare "
                                          "with the claim (95% Wilson intervals). Rerun with --resume to "
                                          "continue an interrupted evaluation in the same --out.")
    p.add_argument("name", help="RobustBench model id, e.g. Cui2023Decoupled_WRN-34-10")
    _dataset_args(p)
    p.add_argument("--n-examples", type=int, default=None, help="first N test points (default: all)")
    p.add_argument("--model-dir", default="models", help="robustbench model dir: {dir}/{dataset}/{tm}/{name}.pt")
    p.add_argument("--data-dir", default=None,
                   help="dataset root with cifar-10-batches-py/ or cifar-100-python/ (default: $ADVGKL_DATA or "
                        "~/.cache/advgkl/data, as every advgkl command)")
    p.add_argument("--out", default=None, help="output dir (default runs/reproduce/{dataset}_{tm}_{name}_n{N})")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--wandb", default="offline", choices=WANDB_MODES)
    p.add_argument("--version", default="standard", choices=list(AA_VERSIONS),
                   help="AutoAttack version (default and leaderboard: standard; fast = APGD-CE + APGD-T screening)")
    p.add_argument("--attacks", nargs="+", default=None, help="with --version custom, e.g. apgd-ce apgd-t")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--offline", action="store_true",
                   help="never download anything: a missing checkpoint (checked first) or test set is an error")
    p.add_argument("--resume", action="store_true",
                   help="reuse an --out that holds this reproduce run: continue its saved AutoAttack state, or "
                        "return a finished one's numbers at once (without it such an --out is refused)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_reproduce)


def _add_export(subparsers) -> None:
    p = subparsers.add_parser("export-robustbench", help="write a run as a RobustBench model_info JSON + weights",
                              description="Turn RUN_DIR (results.json + checkpoints/final.pt) into "
                                          "OUT/model_info/{dataset}/{tm}/{name}.json and OUT/{dataset}/{tm}/{name}.pt.")
    p.add_argument("run_dir")
    p.add_argument("--name", default=None, help="model id (default advgkl_{method}_{architecture})")
    p.add_argument("--out", default=None, help="output dir (default RUN_DIR/robustbench)")
    p.add_argument("--architecture", default=None, help="e.g. WideResNet-34-10 (default: from the model name)")
    p.add_argument("--link", default="", help="paper URL")
    p.add_argument("--paper-title", default="", help="the JSON's 'name' field (paper title)")
    p.add_argument("--authors", default="")
    p.add_argument("--venue", default="")
    p.add_argument("--footnote", default=None)
    p.add_argument("--additional-data", action=argparse.BooleanOptionalAction, default=None,
                   help="trained with extra real data (RobustBench counts generated data as no)")
    p.set_defaults(func=_cmd_export)
