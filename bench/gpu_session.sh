#!/usr/bin/env bash
# One device call on a lent GPU: install what the GPU image lacks, then run bench/gpu_session.py's steps
# (correctness, headline ratios, tune, train) under one budget, each step's results in $OUT as it ends.
#
#   bench/gpu_session.sh [--budget SECONDS] [--dry-run] [--steps ...] [--caps STEP=S,...] [...]
#
# The budget (default 540 s) counts from this script's start, installation included. $OUT (else
# ./gpu-out) gets at most three files: results.tar.gz (unpack at the repository root:
# bench/results/<gpu>/ and kernels/configs/<gpu>.json), session.log and summary.md. --dry-run runs the
# same steps on a CPU at tiny sizes and installs nothing (CI: bench/test_gpu_session.py).
# On the GPU machine: carry .whl (../shared/tools/gpu-wheels.sh puts the bitsandbytes wheel there) and set
# PEFTFAST_GIT_COMMIT, since the copy there has no .git. The exact device call is in bench/README.md.
set -uo pipefail
cd "$(dirname "$0")/.."
export PEFTFAST_SESSION_T0=${PEFTFAST_SESSION_T0:-$(date +%s.%N)}
export PEFTFAST_SESSION_COMMAND="bench/gpu_session.sh $*"
export PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
dry=0
for a in "$@"; do [ "$a" = --dry-run ] && dry=1; done
if [ "$dry" = 0 ]; then
  if ls .whl/*.whl >/dev/null 2>&1; then
    "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
      || { echo "gpu_session.sh: installing the carried wheels in .whl/ failed (see above)" >&2; exit 1; }
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
  else
    echo "gpu_session.sh: warning: no .whl/*.whl, so no bitsandbytes (the GPU image lacks it): every NF4 case" \
         "will be unavailable; run ../shared/tools/gpu-wheels.sh here and carry .whl" >&2
  fi
  # --no-deps: the image's own torch/triton/transformers/peft stay as they are (never pin torch there).
  "$py" -m pip install -q --no-deps --no-build-isolation -e . \
    || { echo "gpu_session.sh: pip install -e . failed (see above)" >&2; exit 1; }
fi
exec "$py" bench/gpu_session.py "$@"
