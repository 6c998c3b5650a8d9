"""How many students one teacher server keeps fed: server throughput with N = 1, 2, 4, 8 replay students against
teacher mode of the same engine alone, same run; then what that means per GPU for disaggregated KD.

    python benchmarks/serve_capacity.py --preset cpu --out benchmarks/results/serve_capacity_cpu.json   # ~2 min
    python benchmarks/serve_capacity.py --preset gpu --student-step-ms 250 --out $OUT/serve_capacity_h200.json

One `kd-teacher serve` teacher (`kd_teacher.serve.serve`, in a thread of this process, over shared memory) runs
for the whole run; for each N, N replay students (together `micro_batches_per_phase` micro-batches) (`kd_teacher.testing.replay_student`, one process each) join
it, wait until all are connected, send their recorded micro-batches (`--max-in-flight` ahead, as the KD hook
does) and copy every payload into a buffer (pinned with CUDA), then leave. Students coming and going between
phases is part of what is measured.

  teacher alone  TeacherEngine.score of one micro-batch after another in this process (no transport), timed
                 before the first phase and after each: tokens/s and the teacher forward time t_T per
                 micro-batch (a phase's baseline: the faster of the runs just before and after it)
  server, N      tokens scored (the server's count) and delivered (the students' replies) per second, from
                 the moment all N students may send until the last reply; ratio = delivered / teacher alone;
                 p50/p99 reply latency (from submit to the payload taken in, at the students)
  student step   t_S: one training step (forward, backward, SGD) of the student model on one micro-batch,
                 measured here on the CPU preset; `--student-step-ms` on the GPU preset (not measured here:
                 the student would need GPUs of its own)

Per GPU, per micro-batch (no overlap assumed lost in either case):
  co-located KD      each GPU runs the teacher forward and the student step:  1 / (t_T + t_S)
  disaggregated KD   1 teacher GPU : N student GPUs, each student steps in t_S while the server answers:
                     min(N / t_S, C_N) / (N + 1), C_N = the server's measured micro-batches/s with N students
                     (C for the N between the measured ones: the nearest measured N below, never above)
The ratio of the two for N = 1..8 is printed with the N at which disaggregation wins (ratio > 1), if any.
Without batching making the teacher faster than alone (C_N <= 1 / t_T), the best it can do is break even
(N = t_S / t_T, ratio 1): the win comes only from what co-location costs beyond t_T + t_S, or from a server
that scores more tokens per second in shared forwards than one student's micro-batches alone.

On the CPU preset the students share the 2 cores with the server: their Python per message takes time from the
teacher, so the ratio there is a lower bound for a teacher with a GPU of its own.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import sync  # noqa: E402

from kd_teacher.config import from_dict  # noqa: E402
from kd_teacher.serve import ServeConfig, ServeStats, serve  # noqa: E402
from kd_teacher.serve_batching import percentile  # noqa: E402
from kd_teacher.testing.replay_student import micro_batches  # noqa: E402

PRESETS = {
    "cpu": dict(
        model=dict(num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=352,
                   vocab_size=8000, max_sequence_length=256, layer_spec="local", precision=dict(params_dtype="float32")),
        student=dict(num_layers=2, hidden_size=128, num_attention_heads=4, num_query_groups=2, ffn_hidden_size=352),
        k=64, batch=2, seq=128, micro_batches_per_phase=96, max_in_flight=2, max_tokens_per_batch=1024, students=[1, 2, 4, 8],
        alone_iters=15,
    ),
    "gpu": dict(
        model=dict(num_layers=16, hidden_size=2048, num_attention_heads=16, num_query_groups=8, ffn_hidden_size=5632,
                   vocab_size=128256, max_sequence_length=4096, layer_spec="transformer_engine",
                   precision=dict(params_dtype="bfloat16")),
        student=None, k=64, batch=2, seq=4096, micro_batches_per_phase=160, max_in_flight=2, max_tokens_per_batch=16384,
        students=[1, 2, 4, 8], alone_iters=20,
    ),
}


def serve_config(p: dict, name: str, repacking: str) -> ServeConfig:
    return from_dict(ServeConfig, dict(
        model=p["model"], allow_random_weights=True,  # a random teacher serves as fast as a trained one
        engine=dict(k=p["k"], max_tokens_per_batch=p["max_tokens_per_batch"], repacking=repacking),
        serve=dict(transport="shm", name=name, max_tokens_per_request=p["batch"] * p["seq"],
                   max_in_flight_per_student=max(p["max_in_flight"], 1), max_wait_ms=2.0, status_interval_s=5.0),
    ), "serve_capacity")


def teacher_alone(engine, p: dict) -> dict:
    """TeacherEngine.score of the students' micro-batches one after another, no transport."""
    batches = micro_batches(0, 0, p["alone_iters"], [p["seq"]], p["batch"], p["batch"], p["model"]["vocab_size"])
    device = "cuda" if torch.cuda.is_available() else "cpu"
    for tokens in batches[:3]:
        engine.score(tokens.to(device))
    sync()
    times = []
    for tokens in batches:
        t0 = time.perf_counter()
        engine.score(tokens.to(device))
        sync()
        times.append(time.perf_counter() - t0)
    t = statistics.median(times)
    return dict(forward_s=t, tokens_per_s=p["batch"] * p["seq"] / t, iters=len(times))


def student_step(p: dict) -> float:
    """Median seconds of one training step (forward, CE backward, SGD) of the student model on a micro-batch."""
    from kd_teacher.engine.model import ModelConfig, build_gpt_model

    model_dict = dict(p["model"], **p["student"])
    mcfg = from_dict(ModelConfig, model_dict, "student")
    model, _ = build_gpt_model(mcfg)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-4)
    tokens = micro_batches(1, 0, 1, [p["seq"]], p["batch"], p["batch"], mcfg.vocab_size)[0]
    pos = torch.arange(p["seq"]).unsqueeze(0).expand_as(tokens)
    times = []
    for i in range(8):
        t0 = time.perf_counter()
        logits = model(tokens, pos, None)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                 tokens[:, 1:].reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= 2:
            times.append(time.perf_counter() - t0)
    del model, opt
    return statistics.median(times)


def phase(name: str, n: int, p: dict, stats: ServeStats, workdir: Path) -> dict:
    """N replay students join the running server, send together, leave."""
    go = workdir / f"go-{n}"
    per_student = -(-p["micro_batches_per_phase"] // n)
    procs, outs = [], []
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    for rank in range(n):
        out = workdir / f"n{n}-s{rank}.pt"
        outs.append(out)
        cmd = [sys.executable, "-m", "kd_teacher.testing.replay_student", "--transport", "shm", "--name", name,
               "--rank", str(rank), "--num-students", str(n), "--requests", str(per_student), "--seed", str(n),
               "--lengths", str(p["seq"]), "--min-batch", str(p["batch"]), "--max-batch", str(p["batch"]),
               "--k", str(p["k"]), "--vocab-size", str(p["model"]["vocab_size"]),
               "--max-in-flight", str(p["max_in_flight"]), "--timeout-s", "600", "--pinned", "--go", str(go),
               "--out", str(out)]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                      stderr=open(f"{out}.log", "w")))
    deadline = time.monotonic() + 600
    while not all(Path(f"{o}.ready").exists() for o in outs):
        if time.monotonic() > deadline or any(pr.poll() not in (None, 0) for pr in procs):
            raise RuntimeError(f"replay students did not connect; see {workdir}/n{n}-s*.pt.log")
        time.sleep(0.01)
    tokens0, forwards0, requests0 = stats.tokens, stats.forwards, stats.requests
    start = time.time()
    go.touch()
    for pr in procs:
        if pr.wait(timeout=1200) != 0:
            raise RuntimeError(f"a replay student failed; see {workdir}/n{n}-s*.pt.log")
    results = [torch.load(o) for o in outs]
    end = max(r["ended"] for r in results)
    wall = end - start
    latency = [x for r in results for x in r["latency_s"]]
    delivered = sum(r["tokens"] for r in results)
    return dict(students=n, wall_s=wall, delivered_tokens=delivered, delivered_tokens_per_s=delivered / wall,
                scored_tokens_per_s=(stats.tokens - tokens0) / wall, forwards=stats.forwards - forwards0,
                requests=stats.requests - requests0, micro_batches_per_s=len(latency) / wall,
                latency_ms_p50=1e3 * percentile(latency, 50), latency_ms_p99=1e3 * percentile(latency, 99))


def per_gpu(t_teacher: float, t_student: float, capacity: dict, up_to: int = 8) -> list:
    """Disaggregated (1 teacher : N students) over co-located KD throughput per GPU, N = 1..up_to."""
    measured = sorted(capacity)
    rows = []
    for n in range(1, up_to + 1):
        below = [m for m in measured if m <= n]
        c = capacity[below[-1]] if below else capacity[measured[0]]
        disagg = min(n / t_student, c) / (n + 1)
        colocated = 1.0 / (t_teacher + t_student)
        rows.append(dict(students=n, capacity_micro_batches_per_s=c, disaggregated_per_gpu=disagg,
                         colocated_per_gpu=colocated, ratio=disagg / colocated, teacher_bound=c < n / t_student))
    return rows


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--student-step-ms", type=float, default=None,
                    help="the student's step time per micro-batch (GPU preset: required; CPU: measured unless given)")
    ap.add_argument("--students", help="comma-separated N (default 1,2,4,8)")
    ap.add_argument("--micro-batches", type=int, help="micro-batches per phase, split over its students")
    ap.add_argument("--repacking", choices=["off", "any"], default="off",
                    help="engine.repacking of the server (off: the default policy)")
    ap.add_argument("--out", help="write the result JSON here")
    args = ap.parse_args()
    # The server's own status lines (students, queue depth, tokens/s, batch fill) go to stderr with the results.
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("kd_teacher.serve").setLevel(logging.INFO)
    p = dict(PRESETS[args.preset])
    if args.micro_batches:
        p["micro_batches_per_phase"] = args.micro_batches
    if args.students:
        p["students"] = [int(x) for x in args.students.split(",")]
    if args.student_step_ms is None and p["student"] is None:
        ap.error("--student-step-ms is needed with the gpu preset (the student's own step time, measured elsewhere)")
    torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2) if args.preset == "cpu" else torch.get_num_threads())
    load_start = list(os.getloadavg())  # the machine may be shared: recorded with the result
    name = f"cap-{uuid.uuid4().hex[:8]}"
    cfg = serve_config(p, name, args.repacking)
    from kd_teacher.engine.model import init_model_parallel

    init_model_parallel(cfg.model)
    from kd_teacher.engine.loading import build_engine

    # Kept for the whole run: teacher alone is timed again beside every phase, so that the machine's drifting
    # load (a shared 2-core machine) hits baseline and server alike.
    alone_engine = build_engine(cfg.teacher())
    alone = teacher_alone(alone_engine, p)
    print(f"teacher alone: {alone['tokens_per_s']:.0f} tokens/s, {1e3 * alone['forward_s']:.1f} ms per "
          f"[{p['batch']}, {p['seq']}] micro-batch", flush=True)
    if args.student_step_ms is not None:
        t_student, student_source = args.student_step_ms / 1e3, "given (--student-step-ms)"
    else:
        t_student, student_source = student_step(p), "measured in this run"
    print(f"student step: {1e3 * t_student:.1f} ms ({student_source})", flush=True)

    stats, stop, ready, box = ServeStats(), threading.Event(), threading.Event(), {}

    def run_server():
        try:
            serve(cfg, stop, ready, stats)
        except BaseException as e:  # noqa: BLE001 - reported below
            box["error"] = e
            ready.set()

    server = threading.Thread(target=run_server, daemon=True)
    server.start()
    ready.wait(600)
    if "error" in box:
        raise box["error"]
    phases = []
    with tempfile.TemporaryDirectory() as tmp:
        try:
            baselines = [alone]
            for n in p["students"]:
                r = phase(name, n, p, stats, Path(tmp))
                baselines.append(teacher_alone(alone_engine, p))
                # the faster of the teacher-alone runs just before and just after this phase
                base = max(baselines[-2:], key=lambda b: b["tokens_per_s"])
                r["teacher_alone_tokens_per_s"] = base["tokens_per_s"]
                r["ratio_to_teacher_alone"] = r["delivered_tokens_per_s"] / base["tokens_per_s"]
                phases.append(r)
                print(f"N={n}: {r['delivered_tokens_per_s']:.0f} tokens/s delivered "
                      f"({r['scored_tokens_per_s']:.0f} scored), x{r['ratio_to_teacher_alone']:.2f} of teacher "
                      f"alone; latency p50 {r['latency_ms_p50']:.1f} ms, p99 {r['latency_ms_p99']:.1f} ms", flush=True)
        finally:
            stop.set()
            server.join(timeout=60)
    # t_T for the per-GPU model: the median of all teacher-alone runs
    alone = dict(alone, forward_s=statistics.median(b["forward_s"] for b in baselines),
                 forward_s_runs=[b["forward_s"] for b in baselines])
    alone["tokens_per_s"] = p["batch"] * p["seq"] / alone["forward_s"]
    capacity = {r["students"]: r["micro_batches_per_s"] for r in phases}
    rows = per_gpu(alone["forward_s"], t_student, capacity)
    print("\nper-GPU throughput, disaggregated (1 teacher : N students) over co-located KD")
    print(f"  (t_T {1e3 * alone['forward_s']:.1f} ms teacher forward, t_S {1e3 * t_student:.1f} ms student step)")
    for row in rows:
        print(f"  N={row['students']}: x{row['ratio']:.2f}{'  (teacher-bound)' if row['teacher_bound'] else ''}")
    wins = [row["students"] for row in rows if row["ratio"] > 1.005]  # more than rounding
    best = max(rows, key=lambda row: row["ratio"])
    verdict = (f"disaggregation wins from N = {wins[0]}" if wins else
               f"disaggregation does not win for N <= 8 (best x{best['ratio']:.2f} at N = {best['students']})")
    print(verdict)
    at4 = next((r["ratio_to_teacher_alone"] for r in phases if r["students"] == 4), None)
    result = dict(
        benchmark="serve_capacity", preset=args.preset, date=time.strftime("%Y-%m-%d"),
        command=" ".join([Path(sys.executable).name, *sys.argv]),
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else _cpu_name(),
        cpu_count=os.cpu_count(), load_avg_start_end=[load_start, list(os.getloadavg())], torch=torch.__version__,
        repacking=args.repacking,
        micro_batch=[p["batch"], p["seq"]], k=p["k"], micro_batches_per_phase=p["micro_batches_per_phase"],
        max_in_flight=p["max_in_flight"], max_tokens_per_batch=p["max_tokens_per_batch"], model=p["model"],
        teacher_alone=alone, student_step_s=t_student, student_step_source=student_source, phases=phases,
        per_gpu=rows, verdict=verdict, ratio_at_4=at4, target_at_4_gpu=0.95,
    )
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
