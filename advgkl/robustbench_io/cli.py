"""``advgkl leaderboard | reproduce | export-robustbench``: argparse wiring onto the other modules."""
from __future__ import annotations

import argparse
import json
import re

from ..logging import WANDB_MODES
from .board import boards, format_leaderboard, format_table, leaderboard, supported
from .export import export_robustbench
from .reproduction import reproduce
from .testsets import layout


def _dataset_args(p, default: str | None = "cifar10", tm_default: str | None = "Linf") -> None:
    p.add_argument("--dataset", default=default, choices=sorted({d for d, _ in supported()}))
    p.add_argument("--threat-model", default=tm_default, choices=sorted({t for _, t in supported()}))


def _matching(rows: list[dict], grep: str | None) -> list[dict]:
    if not grep:
        return rows
    pattern = re.compile(re.escape(grep), re.I)
    return [r for r in rows if pattern.search(" ".join(str(r.get(k, "")) for k in
                                                       ("model_name", "architecture", "name", "authors")))]


def _cmd_leaderboard(args) -> None:
    if args.dataset is None and args.threat_model is None:  # no board named: all seven
        _all_boards(args)
        return
    dataset, threat_model = args.dataset or "cifar10", args.threat_model or "Linf"
    rows = _matching(leaderboard(dataset, threat_model), args.grep)
    if args.json:
        print(json.dumps(rows, indent=2))
    elif not rows:
        print(f"no {dataset} {threat_model} entries match {args.grep!r}")
    else:
        print(format_leaderboard(rows))


def _all_boards(args) -> None:
    """Without --grep: one line per board; with it: the matching entries of every board, board by board."""
    if not args.grep:
        rows = [dict(b, data=layout(b["dataset"], b["threat_model"])) for b in boards()]
        if args.json:
            print(json.dumps(rows, indent=2))
            return
        lines = [(b["dataset"], b["threat_model"], b["metric"], b["eps"] or "-", str(b["entries"]),
                  str(b["checkpoints"]), b["data"]) for b in rows]
        print(format_table(("dataset", "threat model", "metric", "eps", "entries", "checkpoints",
                            "reproduce reads under --data-dir"), lines, right={4, 5}))
        print("one board: advgkl leaderboard --dataset DATASET --threat-model THREAT_MODEL [--grep TEXT]")
        return
    found = {f"{d} {t}": _matching(leaderboard(d, t), args.grep) for d, t in supported()}
    found = {k: v for k, v in found.items() if v}
    if args.json:
        print(json.dumps([r for rows in found.values() for r in rows], indent=2))
    elif not found:
        print(f"no entries on any board match {args.grep!r}")
    else:
        print("\n\n".join(f"{board}\n{format_leaderboard(rows)}" for board, rows in found.items()))


def _cmd_reproduce(args) -> None:
    reproduce(args.name, args.dataset, args.threat_model, n_examples=args.n_examples, model_dir=args.model_dir,
              data_dir=args.data_dir, out_dir=args.out, batch_size=args.batch_size, device=args.device,
              wandb=args.wandb, version=args.version, attacks=args.attacks, seed=args.seed,
              download=not args.offline, progress=not args.no_progress, resume=args.resume)


def _cmd_export(args) -> None:
    export_robustbench(args.run_dir, name=args.name, out_dir=args.out, architecture=args.architecture,
                       link=args.link, paper_title=args.paper_title, authors=args.authors, venue=args.venue,
                       footnote=args.footnote, additional_data=args.additional_data, threat_model=args.threat_model)


def register_cli(subparsers) -> None:
    """Adds ``leaderboard``, ``reproduce`` and ``export-robustbench`` to an argparse subparsers object."""
    _add_leaderboard(subparsers)
    _add_reproduce(subparsers)
    _add_export(subparsers)


def _add_leaderboard(subparsers) -> None:
    p = subparsers.add_parser("leaderboard", help="list RobustBench leaderboard entries (shipped metadata)",
                              description="Without --dataset / --threat-model: the seven boards (with --grep: the "
                                          "matching entries of every board). With them (the other defaults to "
                                          "cifar10 / Linf): one board's entries: name, architecture, clean "
                                          "accuracy and the board's metric (%: AutoAttack accuracy, or corruption "
                                          "accuracy on a corruptions board), extra data; best first.")
    _dataset_args(p, None, None)
    p.add_argument("--grep", default=None, help="case-insensitive substring of name, architecture, paper or authors")
    p.add_argument("--json", action="store_true", help="print the metadata as JSON instead of a table")
    p.set_defaults(func=_cmd_leaderboard)


def _add_reproduce(subparsers) -> None:
    from advgkl.attacks import AA_VERSIONS

    p = subparsers.add_parser("reproduce", help="check a leaderboard entry's claimed clean and AutoAttack accuracy",
                              description="Load a RobustBench checkpoint, measure clean accuracy and the board's "
                                          "metric on the first N test points (AutoAttack with the leaderboard's "
                                          "eps; on a corruptions board the mean accuracy over 15 corruptions x 5 "
                                          "severities) and compare with the claim (95% Wilson intervals). Rerun "
                                          "with --resume to continue an interrupted evaluation in the same --out.")
    p.add_argument("name", help="RobustBench model id, e.g. Cui2023Decoupled_WRN-34-10")
    _dataset_args(p)
    p.add_argument("--n-examples", type=int, default=None,
                   help="first N test points (default: all; ImageNet: RobustBench's 5,000-image subset)")
    p.add_argument("--model-dir", default="models", help="robustbench model dir: {dir}/{dataset}/{tm}/{name}.pt")
    p.add_argument("--data-dir", default=None,
                   help="dataset root: cifar-10-batches-py/, cifar-100-python/, CIFAR-10-C/, CIFAR-100-C/, val/ "
                        "(ImageNet), ImageNet-C/ (default: $ADVGKL_DATA or ~/.cache/advgkl/data, as every advgkl "
                        "command); see docs/robustbench.md")
    p.add_argument("--out", default=None, help="output dir (default runs/reproduce/{dataset}_{tm}_{name}_n{N})")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--device", default=None, choices=["cpu", "cuda"], help="default: cuda when available")
    p.add_argument("--wandb", default="offline", choices=WANDB_MODES)
    p.add_argument("--version", default="standard", choices=list(AA_VERSIONS),
                   help="AutoAttack version (default and leaderboard: standard; fast = APGD-CE + APGD-T screening)")
    p.add_argument("--attacks", nargs="+", default=None, help="with --version custom, e.g. apgd-ce apgd-t")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--offline", action="store_true",
                   help="never download anything: a missing checkpoint (checked first) or test set is an error "
                        "(ImageNet data is never downloaded)")
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
    p.add_argument("--threat-model", default=None, choices=sorted({t for _, t in supported()}),
                   help="the board (default: the run's threat model); corruptions needs corruptions_acc in "
                        "results.json")
    p.set_defaults(func=_cmd_export)
