#!/usr/bin/env bash
# The fused top-k kernel on one GPU: correctness check (cases split over parallel processes, so that
# Triton's compiles run in parallel), then the benchmark. Writes check.json, check.log, bench.json and
# bench.log under $OUT.   Usage, from the repository root:  bash benchmarks/topk_kernel_gpu.sh
set -u
OUT=${OUT:-/tmp/topk_kernel_out}
SHARDS=${SHARDS:-8}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
work=$(mktemp -d)
mkdir -p "$OUT"
for i in $(seq 0 $((SHARDS - 1))); do
  python3 benchmarks/check_topk_kernel.py --shard "$i/$SHARDS" --out "$work/check_$i.json" >"$work/check_$i.log" 2>&1 &
done
wait
cat "$work"/check_*.log >"$OUT/check.log"
python3 benchmarks/check_topk_kernel.py --merge "$work"/check_*.json --out "$OUT/check.json"
check_rc=$?
python3 benchmarks/topk_kernel.py --out "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log"
exit $check_rc
