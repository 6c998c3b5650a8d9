#!/usr/bin/env bash
# The project's GPU measurements, one named check at a time, for a device session that is short and costly:
#   bash benchmarks/gpu_checks.sh kd_step ce_kd onpolicy      (OUT=<dir>, default $OUT or ./gpu_out)
# Each check runs under its own time limit, logs to OUT/logs/<check>.log and writes its JSON under OUT;
# OUT/summary.json says which ran, their exit status and seconds, so a call cut short still says how far it got.
# `list` prints the checks in the order they are owed (the order a session with little time should run them).
# Megatron-LM checks need MEGATRON_LM=<checkout> (not vendored: docs/megatron_lm.md section 1).
set -u
OUT="${OUT:-${PWD}/gpu_out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT/logs"

declare -A CMD LIMIT
CMD[kd_step]="$PY benchmarks/kd_step.py --preset gpu --profile --out $OUT/kd_step_h200.json"; LIMIT[kd_step]=300
CMD[ce_kd]="$PY benchmarks/check_ce_kd.py --out $OUT/check_ce_kd_h200.json"; LIMIT[ce_kd]=150
CMD[onpolicy]="$PY benchmarks/onpolicy.py --preset gpu --out $OUT/onpolicy_h200.json"; LIMIT[onpolicy]=400
CMD[megatron_lm]="bash examples/megatron_lm/run_kd_gpu.sh --out $OUT/megatron_lm_h200.json"; LIMIT[megatron_lm]=540
CMD[hf_gap]="$PY benchmarks/hf_gap.py --preset gpu --out $OUT/hf_gap_h200.json"; LIMIT[hf_gap]=300
CMD[moe]="$PY benchmarks/teacher_mode.py --preset gpu --moe --out $OUT/teacher_mode_moe_h200.json"; LIMIT[moe]=150
CMD[serve]="$PY benchmarks/serve_capacity.py --preset gpu --out $OUT/serve_capacity_h200.json"; LIMIT[serve]=400
CMD[invariance]="$PY benchmarks/batch_invariance.py --preset gpu --out $OUT/batch_invariance_h200.json"; LIMIT[invariance]=300
CMD[quality]="$PY benchmarks/quality_per_byte.py --preset gpu --out $OUT/quality_per_byte_h200.json"; LIMIT[quality]=400
CMD[pytest_gpu]="$PY -m pytest -q -m gpu tests/gpu"; LIMIT[pytest_gpu]=300
CMD[kd_step_1b]="$PY benchmarks/kd_step.py --preset gpu-1b --out $OUT/kd_step_1b_h200.json"; LIMIT[kd_step_1b]=300
CMD[dump]="$PY benchmarks/dump.py --preset gpu --out $OUT/dump_h200.json"; LIMIT[dump]=300
ORDER="kd_step ce_kd onpolicy megatron_lm hf_gap moe serve invariance quality pytest_gpu kd_step_1b dump"

if [ "${1:-}" = "list" ] || [ $# -eq 0 ]; then
    for c in $ORDER; do printf '%-12s %4ss  %s\n' "$c" "${LIMIT[$c]}" "${CMD[$c]}"; done
    exit 0
fi

summary="$OUT/summary.json"
[ -f "$summary" ] || echo '{}' > "$summary"
for c in "$@"; do
    if [ -z "${CMD[$c]:-}" ]; then echo "unknown check '$c' (bash $0 list)" >&2; exit 2; fi
    start=$(date +%s)
    timeout --signal=TERM --kill-after=10 "${LIMIT[$c]}" bash -c "${CMD[$c]}" > "$OUT/logs/$c.log" 2>&1
    rc=$?
    secs=$(( $(date +%s) - start ))
    echo "$c: exit $rc after ${secs} s (log: $OUT/logs/$c.log)"
    $PY - "$summary" "$c" "$rc" "$secs" <<'EOF'
import json, sys
path, check, rc, secs = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
summary = json.load(open(path))
summary[check] = {"exit": rc, "seconds": secs, "timed_out": rc in (124, 137)}
json.dump(summary, open(path, "w"), indent=1)
EOF
done
