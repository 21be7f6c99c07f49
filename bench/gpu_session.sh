#!/usr/bin/env bash
# Everything a session lent a CUDA GPU should run, in as few device calls as possible.
#
#   bench/gpu_session.sh STAGE [STAGE ...]      STAGE: setup | tests | bench | tune | train | all
#
# Why one script: a session gets 30 minutes of device time and at most 8 files back per call, so the
# stages are sized to fit one 10-minute call each and pack their outputs into one archive per stage.
# Writes into $OUT (the device tool's folder) or ./gpu-out:
#   tests.log, tests.xml          pytest -m gpu (junit), every kernel against its reference at Llama shapes
#   tests_models.xml              tests/kernels/test_models_triton.py: patched models, Triton vs reference
#   bench.tar.gz, bench.log       bench/results/<gpu>/*.json + *.png (peftfast bench, full mode)
#   tune.tar.gz, tune.log         kernels/configs/<gpu>.json measured for Llama-3-8B (dense bf16, NF4)
#   train.log, train_log.json, train_loss.png   peftfast train --model --data (QLoRA, bf16) + generate,
#                                 then the same with LoRA on a bf16 base
# Back on the development machine: untar bench.tar.gz / tune.tar.gz at the repository root and commit
# bench/results/<gpu>/ and kernels/configs/<gpu>.json with the logs' first lines (GPU, versions, command).
#
# Typical device calls (carry .whl, made by ../shared/tools/gpu-wheels.sh); no stage has been timed on a
# GPU yet, so split them over more calls if one nears the 10-minute limit:
#   bench/gpu_session.sh setup tests tune
#   bench/gpu_session.sh setup bench train
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
      { versions; echo "command: pytest -m gpu -q tests --junitxml tests.xml;" \
          "pytest -q tests/kernels/test_models_triton.py --junitxml tests_models.xml"; } > "$out/tests.log"
      python3 -m pytest -m gpu -q -rs tests --junitxml "$out/tests.xml" >> "$out/tests.log" 2>&1
      local rc=$?
      # The model-level Triton-vs-reference tests run on CPU too; on a GPU they run the compiled kernels.
      python3 -m pytest -q -rs tests/kernels/test_models_triton.py --junitxml "$out/tests_models.xml" \
          >> "$out/tests.log" 2>&1 || rc=1
      return $rc
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
    train)
      # Issue 6's GPU run: `peftfast train --model DIR --data FILE` on a locally built Llama (random
      # weights, byte-level tokenizer saved beside it: nothing is downloaded), QLoRA in bf16, then
      # `peftfast generate` with the adapter (the M=1 decode path). TRAIN_HIDDEN=64 makes a CPU smoke run.
      local hidden=${TRAIN_HIDDEN:-1024} steps=${TRAIN_STEPS:-100}
      { versions; echo "command: peftfast train --model /tmp/gpu-llama --data peftfast/data/corpus.txt" \
          "--method qlora --bf16 --seq-len 256 --batch-size 8 --max-steps $steps --lr 1e-3 (hidden $hidden);" \
          "then the same with --method lora --max-steps 20"; } > "$out/train.log"
      python3 - "$hidden" >> "$out/train.log" 2>&1 <<'PY' || return 1
import sys
sys.path.insert(0, "tests")
from tiny import byte_chat_tokenizer, tiny_llama_for
hidden = int(sys.argv[1])
tok = byte_chat_tokenizer()
tok.save_pretrained("/tmp/gpu-llama")
model = tiny_llama_for(tok, hidden_size=hidden, intermediate_size=hidden * 11 // 4, num_hidden_layers=8,
                       num_attention_heads=max(1, hidden // 64), num_key_value_heads=max(1, hidden // 256),
                       max_position_embeddings=1024)
model.save_pretrained("/tmp/gpu-llama")
print(f"model: /tmp/gpu-llama, {sum(p.numel() for p in model.parameters()) / 1e6:.1f}M parameters")
PY
      peftfast train --model /tmp/gpu-llama --data peftfast/data/corpus.txt --method qlora --bf16 \
          --seq-len 256 --batch-size 8 --max-steps "$steps" --lr 1e-3 --logging-steps 10 --overwrite \
          --output /tmp/gpu-train >> "$out/train.log" 2>&1 || return 1
      peftfast generate --adapter /tmp/gpu-train --prompt "The " --max-new-tokens 32 >> "$out/train.log" 2>&1 \
          || return 1
      # The dense path of the same command: LoRA on a bf16 base (--bf16 loads the frozen weights in bf16).
      peftfast train --model /tmp/gpu-llama --data peftfast/data/corpus.txt --method lora --bf16 \
          --seq-len 256 --batch-size 8 --max-steps 20 --lr 1e-3 --logging-steps 10 --overwrite \
          --output /tmp/gpu-train-lora >> "$out/train.log" 2>&1 || return 1
      cp /tmp/gpu-train/loss.png "$out/train_loss.png"
      cp /tmp/gpu-train/train_log.json "$out/train_log.json"
      ;;
    all)
      for s in setup tests tune bench train; do run_stage "$s" || status=1; done
      ;;
    *)
      echo "unknown stage '$1' (setup | tests | bench | tune | train | all)" >&2
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
