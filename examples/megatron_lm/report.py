"""Read the logs `run_kd_gpu.sh` collected into one JSON and a short table (printed last).

    python examples/megatron_lm/report.py --work WORK --out RESULT.json

What is read, all from Megatron-LM's own log lines (megatron/training/training.py `training_log` and
`evaluate_and_print_results`): per run the `iteration N/M | ... elapsed time per iteration (ms): T |
throughput per GPU (TFLOP/s/GPU): F | ... lm loss: ... | kd loss: ... |` lines and the `validation loss at
...` lines; the step time of a run is the median of its logged intervals after the first (which holds
start-up, compilation and warm-up). The ratio is offline KD over CE-only, target <= 1.05.
"""

from __future__ import annotations

import argparse
import datetime
import json
import re
import statistics
from pathlib import Path

RUNS = ("ce", "kd_offline", "kd_in_process")
TARGET = 1.05
_ITERATION = re.compile(r"iteration\s+(\d+)/\s*(\d+) \|(.*)$")
_VALIDATION = re.compile(r"validation loss at (.*?) \| (.*)$")
_FIELD = re.compile(r"\s*([^|:]+?):\s+([-+0-9.eEinfa]+)\s*$")
_VERSIONS = {"megatron_core": re.compile(r"Megatron-Core version \.+ (\S+)"),
             "transformer_engine": re.compile(r"Transformer Engine version \.+ (\S+)"),
             "torch": re.compile(r"PyTorch version \.+ (\S+)")}
_PARAMS = re.compile(r"number of parameters on \(tensor, pipeline\) model parallel rank \(0, 0\): (\d+)")


def parse_log(text: str) -> dict:
    """Iterations, validations, versions and failure marks of one Megatron-LM log."""
    out = {"iterations": [], "validations": [], "versions": {}, "parameters": None}
    for line in text.splitlines():
        m = _ITERATION.search(line)
        if m:
            fields = _fields(m.group(3))
            out["iterations"].append({"iteration": int(m.group(1)), "of": int(m.group(2)), **fields})
            continue
        m = _VALIDATION.search(line)
        if m:
            out["validations"].append({"at": m.group(1), **{k.removesuffix(" value"): v for k, v in
                                                          _fields(m.group(2)).items() if not k.endswith("PPL")}})
            continue
        m = _PARAMS.search(line)
        if m:
            out["parameters"] = int(m.group(1))
        for name, pattern in _VERSIONS.items():
            m = pattern.search(line)
            if m and name not in out["versions"]:
                out["versions"][name] = m.group(1)
    out["missing_samples_error"] = "MissingSamplesError" in text
    out["traceback"] = "Traceback (most recent call last)" in text
    return out


def _fields(text: str) -> dict:
    fields = {}
    for part in text.split("|"):
        m = _FIELD.match(part)
        if m:
            try:
                fields[m.group(1).strip()] = float(m.group(2))
            except ValueError:
                pass
    return fields


def step_time_ms(run: dict) -> float | None:
    """Median logged time per iteration, the first logged interval left out."""
    times = [it["elapsed time per iteration (ms)"] for it in run["iterations"][1:]
             if "elapsed time per iteration (ms)" in it]
    return statistics.median(times) if times else None


def summarize(work: Path) -> dict:
    runs = {}
    for name in RUNS:
        path = work / "logs" / f"{name}.log"
        if path.is_file():
            runs[name] = parse_log(path.read_text(errors="replace"))
            runs[name]["step_ms"] = step_time_ms(runs[name])
            tflops = [it.get("throughput per GPU (TFLOP/s/GPU)") for it in runs[name]["iterations"][1:]]
            tflops = [t for t in tflops if t is not None]
            runs[name]["tflops"] = statistics.median(tflops) if tflops else None
    result = {"what": "Megatron-LM pretrain_gpt.py, unmodified: CE-only vs KD (offline dump, in-process teacher)",
              "date": datetime.date.today().isoformat(), "target_ratio": TARGET, "runs": runs}
    for name in ("kd_offline", "kd_in_process"):
        if runs.get(name, {}).get("step_ms") and runs.get("ce", {}).get("step_ms"):
            result[f"ratio_{name}_vs_ce"] = round(runs[name]["step_ms"] / runs["ce"]["step_ms"], 4)
    offline, in_process = runs.get("kd_offline", {}), runs.get("kd_in_process", {})
    pairs = [(a.get("kd loss"), b.get("kd loss")) for a, b in
             zip(offline.get("iterations", []), in_process.get("iterations", []))]
    if pairs and all(a is not None and b is not None for a, b in pairs):
        result["kd_loss_offline_vs_in_process_max_rel_diff"] = max(abs(a - b) / max(abs(b), 1e-12) for a, b in pairs)
    for name in ("prepared.json", "dump.json", "replay.json", "environment.json"):
        path = work / name
        if path.is_file():
            result[name.removesuffix(".json")] = json.loads(path.read_text())
    ratio = result.get("ratio_kd_offline_vs_ce")
    replay = result.get("replay", {})
    result["passed"] = {
        "all_runs_finished": all(name in runs and runs[name]["iterations"] and not runs[name]["traceback"]
                                 for name in RUNS),
        "offline_covered_every_sample": "kd_offline" in runs and not runs["kd_offline"]["missing_samples_error"]
        and bool(runs["kd_offline"]["iterations"]),
        "ratio_within_target": ratio is not None and ratio <= TARGET,
        "replay_ends_as_megatron_lm_intends": replay.get("exit_code") in (16, 17) and not replay.get(
            "missing_samples_error", True),
    }
    return result


def table(result: dict) -> str:
    lines = [f"{'run':<15}{'step ms':>10}{'TFLOP/s':>10}{'lm loss':>10}{'kd loss':>10}{'top1':>8}{'valid lm':>10}"
             f"{'valid kd':>10}"]
    for name, run in result["runs"].items():
        last = run["iterations"][-1] if run["iterations"] else {}
        valid = run["validations"][-1] if run["validations"] else {}

        def num(x, f="{:.4g}"):
            return f.format(x) if isinstance(x, (int, float)) else "-"

        lines.append(f"{name:<15}{num(run['step_ms'], '{:.1f}'):>10}{num(run['tflops'], '{:.1f}'):>10}"
                     f"{num(last.get('lm loss')):>10}{num(last.get('kd loss')):>10}"
                     f"{num(last.get('kd top1 agreement'), '{:.3f}'):>8}{num(valid.get('lm loss')):>10}"
                     f"{num(valid.get('kd loss')):>10}")
    for key in ("ratio_kd_offline_vs_ce", "ratio_kd_in_process_vs_ce"):
        if key in result:
            lines.append(f"{key}: {result[key]:.3f} (target <= {TARGET})" if "offline" in key else
                         f"{key}: {result[key]:.3f}")
    versions = next((r["versions"] for r in result["runs"].values() if r["versions"]), {})
    lines.append("versions: " + ", ".join(f"{k} {v}" for k, v in versions.items()))
    lines.append("passed: " + ", ".join(f"{k}={v}" for k, v in result["passed"].items()))
    return "\n".join(lines)


MARKDOWN_HEADER = ("| Megatron-LM | megatron-core | GPU | student | CE-only step | offline KD step | offline / CE | "
                   "in-process / CE | every sample in the dump | rerun replay | date |\n"
                   "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def markdown_row(result: dict) -> str:
    """One row of docs/megatron_lm.md's table of GPU runs, from a result JSON."""
    env, runs, passed = result.get("environment", {}), result["runs"], result["passed"]
    ce, off = runs.get("ce", {}), runs.get("kd_offline", {})

    def step(run):
        if not run.get("step_ms"):
            return "failed"
        return f"{run['step_ms']:.1f} ms ({run['tflops']:.0f} TFLOP/s)" if run.get("tflops") else f"{run['step_ms']:.1f} ms"

    params = ce.get("parameters")
    commit = (env.get("commit") or "?")[:8]
    return " | ".join([
        f"| {Path(env.get('megatron_lm', '?')).name} ({commit})", env.get("megatron_core", "?"), env.get("gpu") or "-",
        f"{params / 1e9:.2f}B" if params else "-", step(ce), step(off),
        f"{result['ratio_kd_offline_vs_ce']:.3f}" if "ratio_kd_offline_vs_ce" in result else "-",
        f"{result['ratio_kd_in_process_vs_ce']:.3f}" if "ratio_kd_in_process_vs_ce" in result else "-",
        "yes (missing: error)" if passed["offline_covered_every_sample"] else "no",
        f"exit {result.get('replay', {}).get('exit_code', '-')}", f"{result['date']} |"])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work")
    p.add_argument("--out")
    p.add_argument("--markdown", nargs="+", metavar="RESULT.json",
                   help="print docs/megatron_lm.md's table rows for these results instead")
    args = p.parse_args()
    if args.markdown:
        print(MARKDOWN_HEADER)
        for path in args.markdown:
            print(markdown_row(json.loads(Path(path).read_text())))
        return
    if not (args.work and args.out):
        p.error("--work and --out are needed (or --markdown RESULT.json ...)")
    result = summarize(Path(args.work))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(table(result))


if __name__ == "__main__":
    main()
