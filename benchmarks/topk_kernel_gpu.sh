#!/usr/bin/env bash
# The fused top-k kernel on one GPU: its correctness checks (tests/gpu/test_topk_kernel.py, split over parallel
# pytest processes so that Triton's compiles run in parallel), then the benchmark. Writes check.json, check.log,
# bench.json and bench.log under $OUT.   Usage, from the repository root:  bash benchmarks/topk_kernel_gpu.sh
set -u
OUT=${OUT:-/tmp/topk_kernel_out}
SHARDS=${SHARDS:-8}
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH} PYTHONUNBUFFERED=1
work=$(mktemp -d)
mkdir -p "$OUT"
for i in $(seq 0 $((SHARDS - 1))); do
  python3 -m pytest -q -p no:cacheprovider -m gpu tests/gpu/test_topk_kernel.py --gpu-shard "$i/$SHARDS" \
    --gpu-out "$work/check_$i.json" >"$work/check_$i.log" 2>&1 &
done
wait
cat "$work"/check_*.log >"$OUT/check.log"
python3 - "$OUT/check.json" "$work"/check_*.json <<'PY'
import json, sys
parts = [json.load(open(p)) for p in sys.argv[2:]]
merged = dict(parts[0], checks=[c for p in parts for c in p["checks"]])
merged["total"], merged["passed"] = len(merged["checks"]), sum(c["ok"] for c in merged["checks"])
json.dump(merged, open(sys.argv[1], "w"), indent=1)
print(f"{merged['passed']}/{merged['total']} top-k kernel checks pass")
sys.exit(0 if merged["passed"] == merged["total"] else 1)
PY
check_rc=$?
python3 benchmarks/topk_kernel.py --out "$OUT/bench.json" "$@" 2>&1 | tee "$OUT/bench.log"
exit $check_rc
