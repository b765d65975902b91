#!/usr/bin/env bash
# Cross-validation to a decision on the digits task: frozen backbone (freeze=layer_freeze) against full
# fine-tuning (freeze=none).
#
# 1. 5-fold stratified CV with a fixed 20% test part (10 jobs). Every job records its validation and test
#    predictions; the report merges the folds' validation rows into out-of-fold predictions
#    (oof_predictions.<set>.npz, one OOF score per strategy), averages the 5 fold models on the test part
#    (--ensemble) and names the best strategy with its CI and the paired test against the runner-up.
# 2. Nested CV, 5 outer x 3 inner folds (30 jobs): each outer fold's strategy is selected on its inner folds'
#    validation accuracy only and scored on the outer test fold: the nested estimate, next to the naive best.
#
#   examples/cv_decision.sh                      # both sweeps, sequential (basic launcher)
#   LAUNCHER=joblib EPOCHS=10 examples/cv_decision.sh
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
ROOT=${ROOT:-multirun/cv_decision/$(date +%Y-%m-%d_%H-%M-%S)}
mkdir -p "$ROOT"
COMMON=(freeze=none,layer_freeze trainer.max_epochs="${EPOCHS:-5}" trainer.enable_progress_bar=false
        trainer.enable_checkpointing=false ${LAUNCHER:+hydra/launcher=$LAUNCHER})

"$PY" -m lightning_freeze -m split=stratified_kfold 'split.fold=range(5)' split.test_ratio=0.2 \
  "${COMMON[@]}" hydra.sweep.dir="$ROOT/kfold" "$@" > "$ROOT.kfold.log" 2>&1 || { tail -50 "$ROOT.kfold.log"; exit 1; }
"$PY" -m lightning_freeze.splitrun.report "$ROOT/kfold" --ensemble

"$PY" -m lightning_freeze -m split=nested_kfold 'split.outer_fold=range(5)' 'split.inner_fold=range(3)' \
  "${COMMON[@]}" hydra.sweep.dir="$ROOT/nested" "$@" > "$ROOT.nested.log" 2>&1 || { tail -50 "$ROOT.nested.log"; exit 1; }
"$PY" -m lightning_freeze.splitrun.report "$ROOT/nested"
