"""``advgkl export-robustbench``: one of our runs as a RobustBench ``model_info`` JSON plus a weights file."""
from __future__ import annotations

import json
import re
from pathlib import Path

import torch

from advgkl.errors import UserError

from .board import _check_pair, format_eps
from .testsets import TEST_SET_SIZE
from .zoo import check_checkpoint_file, checkpoint_path

REQUIRED_RESULTS = ("dataset", "threat_model", "eps", "model", "method", "clean_acc", "autoattack_acc")
# a corruptions entry: the mean accuracy over 15 corruptions x 5 severities (reproduction.corruption_accuracy)
REQUIRED_CORRUPTION_RESULTS = ("dataset", "model", "method", "clean_acc", "corruptions_acc")
GENERATED_FOOTNOTE = "It uses additional generated images in training."

_ARCH_PATTERNS = [  # advgkl model names -> RobustBench's architecture strings
    (re.compile(r"^(?:wrn|wide_?res_?net)[-_]?(\d+)[-_x](\d+)", re.I), "WideResNet-{0}-{1}"),
    (re.compile(r"^pre_?act_?res_?net[-_]?(\d+)", re.I), "PreActResNet-{0}"),
    (re.compile(r"^res_?net[-_]?(\d+)", re.I), "ResNet-{0}"),
]


def _architecture(model_name: str) -> str:
    for pattern, fmt in _ARCH_PATTERNS:
        m = pattern.match(model_name)
        if m:
            return fmt.format(*m.groups())
    return model_name


def _keys_lost_in_robustbench_format(state_dict: dict) -> list[str]:
    """Keys that robustbench's loader would rename, so they would not load back.

    ``robustbench.utils.load_model`` removes 'module.' and then 'model.' wherever they occur in a key.
    """
    return [k for k in state_dict if "module." in k or "model." in k]


def _uses_generated_data(config: dict) -> bool:
    """Whether training mixed generated images into its batches, read from advgkl.config's own keys.

    ``data.generated`` names the .npz file and ``data.generated_ratio`` is its share of each batch; a
    file with ratio 0 is never mixed in.
    """
    data = config.get("data") if isinstance(config, dict) else None
    if not isinstance(data, dict):
        return False
    return bool(data.get("generated")) and float(data.get("generated_ratio") or 0.0) > 0.0


def _read_results(run_dir: Path, board: str | None = None) -> dict:
    """``{run_dir}/results.json``, checked to hold what an entry of ``board`` (default: the run's threat model) needs."""
    res_path = run_dir / "results.json"
    if not res_path.is_file():
        raise UserError(f"{res_path} not found: export-robustbench needs a finished run directory "
                        f"(results.json written by the final evaluation)")
    try:
        res = json.loads(res_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{res_path} is not valid JSON ({e})") from None
    if board == "corruptions" or (board is None and res.get("threat_model") == "corruptions"):
        missing = [k for k in REQUIRED_CORRUPTION_RESULTS if res.get(k) is None]
        if missing:
            raise UserError(f"{res_path} lacks {missing}; a corruptions entry needs {list(REQUIRED_CORRUPTION_RESULTS)}"
                            f" (corruptions_acc: advgkl.robustbench_io.corruption_accuracy on CIFAR-C / ImageNet-C)")
        _check_pair(res["dataset"], "corruptions")
        return res
    missing = [k for k in REQUIRED_RESULTS if k not in res]
    if missing:
        raise UserError(f"{res_path} lacks {missing}; it needs {list(REQUIRED_RESULTS)}")
    if board is not None and board != res["threat_model"]:
        raise UserError(f"{res_path} holds a {res['threat_model']} evaluation; it cannot be exported to the {board} "
                        f"board")
    _check_pair(res["dataset"], res["threat_model"])
    if res["autoattack_acc"] is None:
        raise UserError(f"{res_path} has no AutoAttack accuracy (evaluated with version 'none'); RobustBench "
                        f"lists AutoAttack accuracy: run 'advgkl eval' with --version standard first")
    return res


def _evaluated_weights(res: dict, run_dir: Path) -> tuple[str, dict]:
    """(which, state dict) of the weights ``res`` reports on; see ``export_robustbench``."""
    which = res.get("evaluated_weights")
    ckpt_file = "best.pt" if which == "best" else "final.pt"
    ckpt_path = Path(res["checkpoint"]) if res.get("checkpoint") else run_dir / "checkpoints" / ckpt_file
    if not ckpt_path.is_file():
        raise UserError(f"{ckpt_path} not found: the run has no final weights to export")
    ckpt = check_checkpoint_file(ckpt_path)
    if which is None:
        which = "ema" if ckpt.get("ema") is not None else "model"
    key = {"ema": "ema", "final": "model", "model": "model", "best": "model"}.get(which)
    state = ckpt.get(key) if key else None
    if not isinstance(state, dict) or not state:
        raise UserError(f"{ckpt_path} has no weights for evaluated_weights={which!r} (the checkpoint holds "
                        f"{sorted(k for k, v in ckpt.items() if isinstance(v, dict) and v)})")
    return which, state


def _plain_state_dict(state: dict) -> dict:
    """CPU copies without torch.compile / DataParallel prefixes; refuses keys robustbench would rename."""
    prefixes = ("_orig_mod.", "module.")  # wrappers, not the architecture
    plain = {}
    for k, v in state.items():
        for p in prefixes:
            k = k[len(p):] if k.startswith(p) else k
        plain[k] = v.detach().cpu().clone() if torch.is_tensor(v) else v
    lost = _keys_lost_in_robustbench_format(plain)
    if lost:
        raise UserError(f"robustbench's loader strips 'module.'/'model.' wherever it occurs in a key, so "
                        f"these keys would not load back: {lost[:5]}; rename the submodules before exporting")
    return plain


def _model_info_json(res: dict, board: str, *, architecture: str, link: str, paper_title: str, authors: str,
                     venue: str, footnote: str | None, additional_data: bool | None) -> dict:
    """RobustBench's model_info fields, in the order of its own files; accuracies as '85.31' strings.

    A corruptions entry has ``corruptions_acc`` where the others have ``autoattack_acc`` / ``unreliable``,
    and the training eps (null when the run's threat model is not Linf / L2), as RobustBench's own do.
    """
    key = "corruptions_acc" if board == "corruptions" else "autoattack_acc"
    clean_acc, acc = float(res["clean_acc"]), float(res[key])
    scale = 100.0 if clean_acc <= 1.0 else 1.0  # results.json may hold fractions or percentages
    if footnote is None:
        footnote = GENERATED_FOOTNOTE if _uses_generated_data(res.get("config") or {}) else ""
    if additional_data is None:
        additional_data = bool(res.get("additional_data", False))
    eps = None
    if res.get("threat_model") in ("Linf", "L2") and res.get("eps") is not None:
        eps = format_eps(float(res["eps"]), res["threat_model"])
    info = {
        "link": link, "name": paper_title or f"advgkl {res['method']}", "authors": authors,
        "additional_data": additional_data, "number_forward_passes": 1, "dataset": res["dataset"],
        "venue": venue, "architecture": architecture, "eps": eps,
        "clean_acc": f"{clean_acc * scale:.2f}", "reported": f"{acc * scale:.2f}", key: f"{acc * scale:.2f}",
    }
    if board != "corruptions":
        info["unreliable"] = False
    if footnote:
        info["footnote"] = footnote
    return info


def _warn_unlike_leaderboard(res: dict, board: str, echo) -> None:
    """Warns when the run's evaluation differs from a leaderboard entry's (full test set, standard AA)."""
    dataset, n = res["dataset"], res.get("n_examples")
    if n is not None and n < TEST_SET_SIZE.get(dataset, n):
        echo(f"warning: evaluated on {n} test points; RobustBench entries use the full test set "
             f"({TEST_SET_SIZE[dataset]})")
    if board != "corruptions" and res.get("autoattack_version", "standard") != "standard":
        echo(f"warning: AutoAttack {res['autoattack_version']!r}; RobustBench entries use 'standard'")


def export_robustbench(run_dir: str | Path, *, name: str | None = None, out_dir: str | Path | None = None,
                       architecture: str | None = None, link: str = "", paper_title: str = "", authors: str = "",
                       venue: str = "", footnote: str | None = None, additional_data: bool | None = None,
                       threat_model: str | None = None, echo=print) -> tuple[Path, Path]:
    """Writes one run as RobustBench would list it; returns (json_path, weights_path).

    Reads ``{run_dir}/results.json`` and the weights it reports on: ``results["evaluated_weights"]`` is
    "ema" (key "ema" of ``checkpoints/final.pt``), "final" / "model" (key "model"), or "best" (key
    "model" of ``checkpoints/best.pt``); without it, "ema" when present, else "model". An ``advgkl
    eval`` results.json names its checkpoint in ``results["checkpoint"]``, which is used instead.
    Writes ``{out}/model_info/{dataset}/{threat_model}/{name}.json`` with the shipped metadata's fields
    and ``{out}/{dataset}/{threat_model}/{name}.pt`` (a plain state dict of CPU tensors), so
    ``load_model(name, model_dir=out, ...)`` reads it once the architecture is in the zoo. ``out``
    defaults to ``{run_dir}/robustbench``. Accuracies in results.json may be fractions or percentages
    (fractions when ``clean_acc <= 1``). The footnote defaults to naming generated training data when
    the run's config mixed it in (``data.generated`` with ``data.generated_ratio`` > 0).
    ``threat_model`` picks the board (default: the run's own): "corruptions" writes a corruptions entry
    from ``results["corruptions_acc"]`` (RobustBench's mean over 15 corruptions x 5 severities, e.g. from
    ``reproduction.corruption_accuracy``) under ``{out}/model_info/{dataset}/corruptions/``.
    """
    from advgkl.checkpoint import atomic_torch_save, write_json

    run_dir = Path(run_dir)
    res = _read_results(run_dir, threat_model)
    board = threat_model or res["threat_model"]
    which, state = _evaluated_weights(res, run_dir)
    weights = _plain_state_dict(state)
    arch = architecture or _architecture(str(res["model"]))
    name = name or f"advgkl_{res['method']}_{arch}".replace(" ", "_")
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.\-]*", name):
        raise UserError(f"--name {name!r}: use letters, digits, '_', '-', '.' (RobustBench model ids)")
    info = _model_info_json(res, board, architecture=arch, link=link, paper_title=paper_title, authors=authors,
                            venue=venue, footnote=footnote, additional_data=additional_data)

    dataset = res["dataset"]
    out = Path(out_dir) if out_dir is not None else run_dir / "robustbench"
    json_path = out / "model_info" / dataset / board / f"{name}.json"
    weights_path = checkpoint_path(name, dataset, board, out)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    write_json(json_path, info)
    atomic_torch_save(weights, weights_path)
    _warn_unlike_leaderboard(res, board, echo)
    echo(f"exported {which!r} weights of {run_dir} as {name}:\n  {json_path}\n  {weights_path}")
    return json_path, weights_path
