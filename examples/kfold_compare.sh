#!/usr/bin/env bash
# 5-fold stratified cross-validation on the digits task: frozen backbone (freeze=layer_freeze) against full
# fine-tuning (freeze=none). Ten jobs in one Hydra multirun; both strategies train on the same five splits
# (a split is a pure function of data, splitter and seed), so the report pairs them by the split manifest.
#
#   examples/kfold_compare.sh                       # sequential (basic launcher)
#   LAUNCHER=joblib examples/kfold_compare.sh       # folds in parallel processes
#   EPOCHS=10 examples/kfold_compare.sh trainer=ddp_cpu   # extra Hydra overrides go last
#
# The app's sweep callback prints the summary (mean, std, 95% CI per strategy; paired difference, CI and
# p-value across folds) and leaves summary.json / summary.md / summary.png at the sweep root. Rebuild it any
# time, e.g. against another baseline: lightning-freeze-report "$SWEEP" --baseline freeze=layer_freeze
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python
SWEEP=${SWEEP:-multirun/kfold_compare/$(date +%Y-%m-%d_%H-%M-%S)}

"$PY" -m lightning_freeze -m \
  split=stratified_kfold 'split.fold=range(5)' \
  freeze=none,layer_freeze \
  trainer.max_epochs="${EPOCHS:-5}" trainer.enable_progress_bar=false \
  ${LAUNCHER:+hydra/launcher=$LAUNCHER} \
  hydra.sweep.dir="$SWEEP" "$@"
