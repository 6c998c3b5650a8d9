#!/usr/bin/env bash
# Megatron-LM's own pretrain_gpt.py, unmodified, on one GPU: CE-only, KD from an offline dump, KD with an
# in-process teacher, and a forced rerun of a step (Megatron-LM's fault diagnosis) under offline KD.
#
#   MEGATRON_LM=/path/to/Megatron-LM bash examples/megatron_lm/run_kd_gpu.sh --out RESULT.json [--preset smoke]
#
# The project does not vendor Megatron-LM: MEGATRON_LM is a checkout (or a copy of its megatron/ package and
# pretrain_gpt.py, gpt_builders.py, model_provider.py). Its megatron/core is the one every step uses: it comes
# first on PYTHONPATH here and, as the script's directory, first on sys.path in the training runs.
#
# Steps (all on the embedded assets, nothing downloaded): prepare.py writes the indexed datasets, the tiny
# teacher as a bf16 checkpoint and the KD blocks; `kd-teacher dump --megatron-args <the student's arguments>`
# dumps the teacher's top-k over the student's train and valid samples; then four Megatron-LM runs (CE-only with
# the plain script; offline KD and the replay through `torchrun -m kd_teacher.megatron_lm`; in-process KD with
# the two-line change made by hand to a copy), and report.py prints the table and writes the JSON: step time
# per run from Megatron-LM's "elapsed time per iteration" (median after the first logged interval), offline KD
# over CE-only (target <= 1.05 for this ~0.37B student, k=64), the loss and KD lines.
# Preset "h200" (default) takes about 6 minutes on one H200; "smoke" is a tiny student for a quick look.
# Without a GPU the script stops after the dump (Megatron-LM needs CUDA).
set -euo pipefail

OUT=""
PRESET=h200
while [ $# -gt 0 ]; do
  case "$1" in
    --out) OUT="$2"; shift 2 ;;
    --preset) PRESET="$2"; shift 2 ;;
    *) echo "run_kd_gpu.sh: unknown argument $1 (--out PATH, --preset h200|smoke)" >&2; exit 2 ;;
  esac
done
: "${MEGATRON_LM:?set MEGATRON_LM to a Megatron-LM checkout (the directory holding pretrain_gpt.py)}"
MEGATRON_LM=$(cd "$MEGATRON_LM" && pwd)
[ -f "$MEGATRON_LM/pretrain_gpt.py" ] || { echo "run_kd_gpu.sh: no pretrain_gpt.py in $MEGATRON_LM" >&2; exit 2; }
REPO=$(cd "$(dirname "$0")/../.." && pwd)
PYTHON=${PYTHON:-python3}
WORK=${WORK:-/tmp/kd_megatron_lm/$(basename "$MEGATRON_LM")-$PRESET}
OUT=${OUT:-$WORK/result.json}
rm -rf "$WORK" && mkdir -p "$WORK/logs"
# The student's megatron-core for every step, then the project (kd_teacher), then whatever was there.
export PYTHONPATH="$MEGATRON_LM:$REPO${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
export CUDA_DEVICE_MAX_CONNECTIONS=1  # what Megatron-LM's example scripts set
# Megatron-LM compiles its dataset helpers at start-up ("make" in megatron/core/datasets); a copy that ships
# them prebuilt must look up to date to make however the files were copied.
touch -c "$MEGATRON_LM"/megatron/core/datasets/helpers_cpp* 2>/dev/null || true
# On a machine without make, that start-up step fails (exit 1) although nothing is to be built: where the
# helpers for this Python are there, a no-op make stands in for it; without them Megatron-LM's error stands.
EXT=$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_config_var("EXT_SUFFIX"))')
if ! command -v make >/dev/null && [ -f "$MEGATRON_LM/megatron/core/datasets/helpers_cpp$EXT" ]; then
  mkdir -p "$WORK/bin" && printf '#!/bin/sh\nexit 0\n' > "$WORK/bin/make" && chmod +x "$WORK/bin/make"
  export PATH="$WORK/bin:$PATH"
fi

if [ "$PRESET" = h200 ]; then  # ~0.37B parameters: 24 layers, hidden 1024, GQA 16/4, SwiGLU 4096
  SEQ=256; ITERS=40; MODEL=(--num-layers 24 --hidden-size 1024 --ffn-hidden-size 4096 --num-attention-heads 16
    --group-query-attention --num-query-groups 4); BATCH=(--micro-batch-size 32 --global-batch-size 128)
elif [ "$PRESET" = smoke ]; then
  SEQ=64; ITERS=6; MODEL=(--num-layers 2 --hidden-size 128 --ffn-hidden-size 256 --num-attention-heads 4
    --group-query-attention --num-query-groups 2); BATCH=(--micro-batch-size 4 --global-batch-size 8)
else
  echo "run_kd_gpu.sh: --preset is h200 or smoke, not $PRESET" >&2; exit 2
fi
K=64
EVAL_INTERVAL=$((ITERS / 2))
D="$WORK/data"
# The student, as a Megatron-LM user writes it (TE layers, fused attention, bf16, Megatron-LM's default fusions
# except gradient-accumulation fusion, which needs Apex). Every run and the dump read these same arguments.
ARGS=("${MODEL[@]}" --seq-length $SEQ --max-position-embeddings $SEQ --position-embedding-type rope
  --normalization RMSNorm --swiglu --disable-bias-linear --untie-embeddings-and-output-weights
  --attention-dropout 0.0 --hidden-dropout 0.0 --bf16 --transformer-impl transformer_engine
  "${BATCH[@]}" --train-iters $ITERS --lr 3e-4 --min-lr 3e-5 --lr-decay-style cosine --lr-warmup-iters 4
  --weight-decay 0.1 --clip-grad 1.0 --seed 1234 --no-gradient-accumulation-fusion
  --train-data-path "$D/train_text_document" --valid-data-path "$D/valid_text_document"
  --data-cache-path "$WORK/cache" --num-workers 2 --tokenizer-type NullTokenizer --vocab-size 4096
  --eval-interval $EVAL_INTERVAL --eval-iters 2 --log-interval $((ITERS / 4)) --log-throughput)

echo "== prepare (data, teacher, KD blocks) in $WORK"
"$PYTHON" "$REPO/examples/megatron_lm/prepare.py" --work "$WORK" --seq-length $SEQ --k $K 2>&1 | tee "$WORK/logs/prepare.log"
"$PYTHON" - "$MEGATRON_LM" > "$WORK/environment.json" <<'EOF'
import json, subprocess, sys
import torch
import megatron.core
import os
root = sys.argv[1]
if os.path.isfile(f"{root}/COMMIT"):  # a copy of a checkout, with the commit it was copied from
    commit = open(f"{root}/COMMIT").read().strip()
elif os.path.exists(f"{root}/.git"):
    commit = subprocess.run(["git", "-C", root, "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
else:
    commit = None
print(json.dumps({"megatron_lm": sys.argv[1], "commit": commit or None, "megatron_core": megatron.core.__version__,
                  "megatron_core_path": megatron.core.__file__, "torch": torch.__version__,
                  "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None}))
EOF
cat "$WORK/environment.json"

echo "== kd-teacher dump over the student's train and valid samples"
"$PYTHON" -m kd_teacher.cli dump "$WORK/dump.yaml" --megatron-args "${ARGS[@]}" 2>&1 | tee "$WORK/logs/dump.log"
grep '^{"dir"' "$WORK/logs/dump.log" | tail -n 1 > "$WORK/dump.json"

if ! "$PYTHON" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
  echo "no GPU here: stopped after the dump (Megatron-LM's training needs CUDA)"
  "$PYTHON" "$REPO/examples/megatron_lm/report.py" --work "$WORK" --out "$OUT"
  exit 0
fi

port=29510
train() {  # train NAME [launcher arguments...]: one Megatron-LM run, its log in $WORK/logs/NAME.log
  local name=$1; shift
  port=$((port + 1))
  echo "== $name"
  "$PYTHON" -m torch.distributed.run --nproc-per-node 1 --master-port $port "$@" "${ARGS[@]}" "${KD[@]}" 2>&1 | tee "$WORK/logs/$name.log" |
    grep -E "iteration +[0-9]+/|validation loss at|Error|error:" || true
}
KD=(); train ce "$MEGATRON_LM/pretrain_gpt.py"
KD=(--kd-config "$WORK/kd_offline.yaml"); train kd_offline -m kd_teacher.megatron_lm "$MEGATRON_LM/pretrain_gpt.py"
# The in-process run uses the two-line change by hand instead of the launcher (docs/megatron_lm.md, "By hand"):
# a copy of pretrain_gpt.py beside the work files, importing gpt_builders and model_provider from MEGATRON_LM.
"$PYTHON" "$REPO/examples/megatron_lm/manual_change.py" "$MEGATRON_LM/pretrain_gpt.py" "$WORK/pretrain_gpt_kd_by_hand.py"
KD=(--kd-config "$WORK/kd_in_process.yaml"); train kd_in_process "$WORK/pretrain_gpt_kd_by_hand.py"

# Megatron-LM's rerun machinery: an error injected at iteration 2 is reproduced by replaying the step's
# micro-batches (read ahead by the offline source); a persistent error ends the job with exit code 17.
echo "== replay: offline KD, persistent error injected at iteration 2"
set +e
RANK=0 LOCAL_RANK=0 WORLD_SIZE=1 MASTER_ADDR=127.0.0.1 MASTER_PORT=$((port + 1)) \
  "$PYTHON" -m kd_teacher.megatron_lm "$MEGATRON_LM/pretrain_gpt.py" "${ARGS[@]}" --kd-config "$WORK/kd_offline.yaml" \
  --train-iters 3 --error-injection-rate 1 --error-injection-type persistent_error > "$WORK/logs/replay.log" 2>&1
code=$?
set -e
"$PYTHON" - "$WORK/logs/replay.log" $code > "$WORK/replay.json" <<'EOF'
import json, sys
text = open(sys.argv[1], errors="replace").read()
print(json.dumps({"exit_code": int(sys.argv[2]), "missing_samples_error": "MissingSamplesError" in text,
                  "rerun_seen": "rerun" in text.lower(),
                  "lines": [l for l in text.splitlines() if "rerun" in l.lower() or "Unexpected result" in l][:8]}))
EOF
cat "$WORK/replay.json"

echo "== report"
"$PYTHON" "$REPO/examples/megatron_lm/report.py" --work "$WORK" --out "$OUT"
