"""RobustBench interop: leaderboard checkpoints, leaderboard metadata, reproduce a claim, export ours.

One module per job; each imports only the ones above it in this list, never the reverse:

- ``zoo``: ``import_robustbench()`` (makes robustbench import in advgkl's pinned environment), its
  model zoo, and checkpoint files: ``checkpoint_path``, ``check_checkpoint_file``, ``hub_weights`` (the
  XCiT entries' timm/torch.hub weights), download, load.
- ``board``: the shipped metadata (``advgkl/model_info/``, seven boards): ``supported``, ``boards``,
  ``metric``, ``leaderboard``, ``leaderboard_entry``, ``format_leaderboard``, ``claimed_per_corruption``,
  ``parse_eps``, ``format_eps``, and ``load_leaderboard_model`` (a zoo model, checked before robustbench
  sees its file).
- ``testsets``: each board's test points through robustbench's loaders (CIFAR-10-C / CIFAR-100-C, the
  ImageNet validation subset, ImageNet-C) with their on-disk layouts checked first: ``load_clean``,
  ``load_corrupted``, ``require_corruptions``, ``layout``.
- ``reproduction``: ``reproduce`` (clean accuracy + the board's metric against the claim),
  ``corruption_accuracy``, ``wilson_interval``, ``verdict``, ``format_report``.
- ``export``: ``export_robustbench`` (one of our runs in RobustBench's layout).
- ``cli``: ``register_cli``: ``advgkl leaderboard | reproduce | export-robustbench``.

Accuracies in metadata, reports and printouts are percentages (RobustBench's convention). The modules
are not named after the functions ``leaderboard`` and ``reproduce``, so neither shadows the other.
"""
from __future__ import annotations

from .zoo import _zoo, check_checkpoint_file, checkpoint_path, import_robustbench
from .board import (MODEL_INFO_DIR, _model_info, boards, claimed_per_corruption, format_eps, format_leaderboard,
                    leaderboard, leaderboard_entry, load_leaderboard_model, metric, parse_eps, supported)
from .testsets import corruptions, layout, load_clean, load_corrupted, require_corruptions
from .reproduction import REPORT_NAME, corruption_accuracy, format_report, reproduce, verdict, wilson_interval
from .export import export_robustbench
from .cli import register_cli

__all__ = [
    "import_robustbench", "supported", "boards", "metric", "leaderboard", "leaderboard_entry", "format_leaderboard",
    "claimed_per_corruption", "parse_eps", "format_eps", "checkpoint_path", "check_checkpoint_file",
    "load_leaderboard_model", "corruptions", "layout", "load_clean", "load_corrupted", "require_corruptions",
    "wilson_interval", "verdict", "reproduce", "corruption_accuracy", "format_report", "export_robustbench",
    "register_cli",
]
