#!/usr/bin/env bash
# Everything a session lent a CUDA GPU should run, in as few device calls as possible.
#
#   bench/gpu_session.sh STAGE [STAGE ...]      STAGE: setup | tests | bench | tune | all
#
# Why one script: a session gets 30 minutes of device time and at most 8 files back per call, so the
# stages are sized to fit one 10-minute call each and pack their outputs into one archive per stage.
# Writes into $OUT (the device tool's folder) or ./gpu-out:
#   tests.log, tests.xml          pytest -m gpu (junit), every kernel against its reference at Llama shapes
#   bench.tar.gz, bench.log       bench/results/<gpu>/*.json + *.png (peftfast bench, full mode)
#   tune.tar.gz, tune.log         kernels/configs/<gpu>.json measured for Llama-3-8B (dense bf16, NF4)
# Back on the development machine: untar bench.tar.gz / tune.tar.gz at the repository root and commit
# bench/results/<gpu>/ and kernels/configs/<gpu>.json with the logs' first lines (GPU, versions, command).
#
# Typical device calls (carry .whl, made by ../shared/tools/gpu-wheels.sh); no stage has been timed on a
# GPU yet, so split them over more calls if one nears the 10-minute limit:
#   bench/gpu_session.sh setup tests tune
#   bench/gpu_session.sh setup bench
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-gpu-out}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0

versions() {
  python3 - <<'EOF'
import datetime, subprocess
import torch, triton
print("date:", datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
print("gpu:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
print("torch", torch.__version__, "cuda", torch.version.cuda, "triton", triton.__version__)
for name in ("bitsandbytes", "transformers", "peft"):
    try:
        print(name, __import__(name).__version__)
    except Exception as e:  # noqa: BLE001 - a missing package is reported, not fatal
        print(name, "unavailable:", type(e).__name__)
print("commit:", subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
      or "unknown (no git)")
EOF
}

run_stage() {
  case "$1" in
    setup)
      # bitsandbytes is not in the device image: the slim wheel travels in .whl/.
      if ls .whl/*.whl >/dev/null 2>&1; then
        python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl || return 1
      fi
      export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
      python3 -m pip install -q --no-deps --no-build-isolation -e . || return 1
      nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
      ;;
    tests)
      { versions; echo "command: pytest -m gpu -q tests --junitxml tests.xml"; } > "$out/tests.log"
      python3 -m pytest -m gpu -q -rs tests --junitxml "$out/tests.xml" >> "$out/tests.log" 2>&1
      ;;
    bench)
      { versions; echo "command: peftfast bench"; } > "$out/bench.log"
      peftfast bench >> "$out/bench.log" 2>&1
      local rc=$?
      tar czf "$out/bench.tar.gz" bench/results 2>> "$out/bench.log"
      return $rc
      ;;
    tune)
      { versions; echo "command: peftfast tune --model llama-3-8b --passes fwd,bwd [--weight nf4]"; } > "$out/tune.log"
      peftfast tune --model llama-3-8b --passes fwd,bwd >> "$out/tune.log" 2>&1 || return 1
      peftfast tune --model llama-3-8b --passes fwd,bwd --weight nf4 >> "$out/tune.log" 2>&1 || return 1
      tar czf "$out/tune.tar.gz" kernels/configs 2>> "$out/tune.log"
      ;;
    all)
      for s in setup tests tune bench; do run_stage "$s" || status=1; done
      ;;
    *)
      echo "unknown stage '$1' (setup | tests | bench | tune | all)" >&2
      return 2
      ;;
  esac
}

[ $# -gt 0 ] || { sed -n 2,18p "$0"; exit 2; }
if [ -d /tmp/site ]; then export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}; fi
for stage in "$@"; do
  echo "== $stage"
  if [ "$stage" = setup ]; then
    run_stage setup || { echo "setup failed" >&2; exit 1; }
  else
    run_stage "$stage" || { echo "$stage: exit status $?" >&2; status=1; }
  fi
  tail -n 5 "$out/$stage.log" 2>/dev/null || true
done
exit $status
