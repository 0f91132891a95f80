#!/usr/bin/env bash
# Reproduce the five Cui2023Decoupled (GKL / DKL) RobustBench entries with `advgkl reproduce`, then print
# claimed vs measured side by side. Every run is resumable: rerunning this script continues where a
# killed run stopped (AutoAttack state in each run's output folder) and skips finished ones instantly.
#
# Environment (defaults in brackets):
#   N           test points per entry [10000 = the full test set, as the leaderboard]; N=1000 gives a
#               ~+-3 pp 95 % interval for a first check
#   MODEL_DIR   robustbench model dir [models]: checkpoints at $MODEL_DIR/{cifar10,cifar100}/Linf/NAME.pt;
#               missing ones are downloaded from RobustBench's Google Drive unless OFFLINE=1
#   DATA_DIR    dataset root [data]: cifar-10-batches-py/ and cifar-100-python/
#   OUT         output root [runs/reproduce_gkl]: one folder per entry with reproduce_report.json
#   DEVICE      cuda | cpu [cuda]            BATCH_SIZE  AutoAttack chunk size [500]
#   WANDB       offline | online | disabled [offline]
#   VERSION     AutoAttack version [standard]  (fast = APGD-CE + APGD-T screening, not comparable)
#   DATASETS    which datasets [cifar10 cifar100]
#   ONLY        run only the ids matching this grep -E pattern [all], e.g. ONLY=WRN-28-10
#   OFFLINE     1 = never download checkpoints [0]
#   PYTHON      the Python with advgkl installed [python]
#   ADVGKL      the advgkl command [$PYTHON -m advgkl]
set -uo pipefail

N=${N:-10000}
MODEL_DIR=${MODEL_DIR:-models}
DATA_DIR=${DATA_DIR:-data}
OUT=${OUT:-runs/reproduce_gkl}
DEVICE=${DEVICE:-cuda}
BATCH_SIZE=${BATCH_SIZE:-500}
WANDB=${WANDB:-offline}
VERSION=${VERSION:-standard}
DATASETS=${DATASETS:-cifar10 cifar100}
ONLY=${ONLY:-.}
OFFLINE=${OFFLINE:-0}
PYTHON=${PYTHON:-python}
ADVGKL=${ADVGKL:-$PYTHON -m advgkl}

ENTRIES=(
  "cifar10 Cui2023Decoupled_WRN-34-10"
  "cifar10 Cui2023Decoupled_WRN-28-10"
  "cifar100 Cui2023Decoupled_WRN-34-10"
  "cifar100 Cui2023Decoupled_WRN-34-10_autoaug"
  "cifar100 Cui2023Decoupled_WRN-28-10"
)

extra=()
[[ "$OFFLINE" == 1 ]] && extra+=(--offline)

failed=()
reports=()
for entry in "${ENTRIES[@]}"; do
  read -r dataset name <<<"$entry"
  [[ " $DATASETS " == *" $dataset "* ]] || continue
  grep -Eq -- "$ONLY" <<<"$name" || continue
  out="$OUT/${dataset}_Linf_${name}_n${N}_${VERSION}"
  echo "=== $dataset $name (N=$N, AutoAttack $VERSION) -> $out"
  if $ADVGKL reproduce "$name" --dataset "$dataset" --threat-model Linf --n-examples "$N" \
      --model-dir "$MODEL_DIR" --data-dir "$DATA_DIR" --out "$out" --batch-size "$BATCH_SIZE" \
      --device "$DEVICE" --wandb "$WANDB" --version "$VERSION" --resume "${extra[@]}"; then
    reports+=("$out/reproduce_report.json")
  else
    failed+=("$dataset $name")
  fi
done

if ((${#reports[@]})); then
  echo
  echo "=== summary (accuracy in %, 95% Wilson intervals)"
  "$PYTHON" - "${reports[@]}" <<'PY'
import json, sys

print("| dataset | model | clean claimed | clean measured [95% CI] | AA claimed | AA measured [95% CI] | N | time (h) | verdict |")
print("|---|---|---|---|---|---|---|---|---|")
for path in sys.argv[1:]:
    r = json.load(open(path))
    c, m = r["claimed"], r["measured"]
    ci = lambda key: "[{:.2f}, {:.2f}]".format(*m[key])
    print(f"| {r['dataset']} | {r['model_name']} | {c['clean_acc']:.2f} | {m['clean_acc']:.2f} {ci('clean_acc_ci95')} "
          f"| {c['autoattack_acc']:.2f} | {m['autoattack_acc']:.2f} {ci('autoattack_acc_ci95')} | {r['n_examples']} "
          f"| {r['wall_time_s'] / 3600:.2f} | {r['verdict']} |")
PY
fi

if ((${#failed[@]})); then
  printf 'failed: %s\n' "${failed[@]}" >&2
  exit 1
fi
