"""The separate-backend gap: kd-teacher's teacher mode against Hugging Face transformers' forward of the same
weights, and against its own training-path forward.

    python benchmarks/hf_gap.py --out $OUT/hf_gap.json                 # GPU: Llama-3.2-1B and Qwen3-MoE shapes, bf16
    python benchmarks/hf_gap.py --preset cpu --out /tmp/hf_gap_cpu.json  # tiny shapes, proves the script on a CPU
    python benchmarks/hf_gap.py --dtype float32 ...                     # the control: same, in fp32

Per model: a random-weight checkpoint of a real public shape is made by transformers (no download), saved as
safetensors, converted by `kd-teacher import-hf` (TE layer spec on a GPU, bf16) and loaded as a teacher YAML
says (`build_engine`, from the Megatron-Core checkpoint). The same token batch goes through

- Hugging Face's forward (bf16, its default attention), full-vocabulary log-softmax in fp32;
- kd-teacher's teacher mode (`engine.score`): top-k ids, log-probs = values / T - lse;
- kd-teacher's training-path forward (`check_consistency`): what a student's in-framework KD sees.

Reported: max and mean |delta log-prob| of the served top-k against HF's log-probs of the same ids, top-1
agreement with HF's argmax, top-k id overlap; and teacher mode against the training path (bitwise, max diff):
the first gap is what a separate inference engine adds, the second is what in-framework serving leaves (zero).
Weights: normal(0, 1/sqrt(fan_in)) matrices, norms in [0.5, 1.5] and the LM head scaled by `logit_scale`, so
that the random teacher's distributions are peaked like a trained model's (entropy and top-1 mass reported).
Needs `transformers` (kd-teacher[hf]); the GPU preset also megatron-core and Transformer Engine.
"""

from __future__ import annotations

import argparse
import gc
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Llama-3.2-1B (tied embeddings, llama3 RoPE scaling) and Qwen3-30B-A3B with fewer layers (fits one H200 twice:
# the HF model and the teacher, each ~7.4B parameters in bf16, and the checkpoint twice on a 64 GB disk).
GPU_MODELS = {
    "llama-3.2-1b": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
        num_key_value_heads=8, head_dim=64, max_position_embeddings=131072, rms_norm_eps=1e-5,
        tie_word_embeddings=True, rope_theta=500000.0,
        rope_scaling={"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                      "original_max_position_embeddings": 8192})),
    "qwen3-moe-30b-a3b-12layers": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        vocab_size=151936, hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_hidden_layers=12,
        num_attention_heads=32, num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
        norm_topk_prob=True, max_position_embeddings=40960, rms_norm_eps=1e-6, rope_theta=1000000.0,
        tie_word_embeddings=False)),
}
CPU_MODELS = {
    "llama-tiny": ("LlamaConfig", "LlamaForCausalLM", dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=256, tie_word_embeddings=True)),
    "qwen3-moe-tiny": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM", dict(
        vocab_size=512, hidden_size=64, intermediate_size=128, moe_intermediate_size=32, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=True, max_position_embeddings=256)),
}
PRESETS = {
    "gpu": dict(models=GPU_MODELS, batch=2, seq=1024, k=64, overrides=["layer_spec=transformer_engine"]),
    "cpu": dict(models=CPU_MODELS, batch=2, seq=64, k=16, overrides=[]),
}
LOGIT_SCALE = 4.0


def make_checkpoint(spec: tuple, directory: Path, device: str, dtype: str) -> None:
    import transformers

    config_cls, model_cls, fields = spec
    config = getattr(transformers, config_cls)(**fields, dtype=dtype)
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(getattr(torch, dtype))  # built in its dtype: an fp32 copy of a bf16 model may not fit
    try:
        with torch.device(device):
            model = getattr(transformers, model_cls)(config)
    finally:
        torch.set_default_dtype(default)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
            else:
                p.normal_(0.0, p.shape[-1] ** -0.5)
        model.get_output_embeddings().weight.mul_(LOGIT_SCALE)
    model.save_pretrained(directory)
    del model


def hf_logprobs(directory: Path, tokens: torch.Tensor, dtype: str) -> torch.Tensor:
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(directory, dtype=getattr(torch, dtype)).to(tokens.device).eval()
    with torch.no_grad():
        logits = model(tokens).logits
    del model
    return torch.log_softmax(logits.float(), dim=-1)


def measure(name: str, spec: tuple, p: dict, workdir: Path, dtype: str) -> dict:
    from kd_teacher.cli import main as cli
    from kd_teacher.engine.consistency import check_consistency
    from kd_teacher.engine.loading import build_engine, load_teacher_config
    from kd_teacher.engine.model import init_model_parallel

    device = "cuda" if torch.cuda.is_available() else "cpu"
    hf_dir, out = workdir / name, workdir / f"{name}-teacher"
    t0 = time.perf_counter()
    make_checkpoint(spec, hf_dir, device, dtype)
    vocab = spec[2]["vocab_size"]
    tokens = torch.randint(0, vocab, (p["batch"], p["seq"]), generator=torch.Generator().manual_seed(1)).to(device)
    ref = hf_logprobs(hf_dir, tokens, dtype)
    t1 = time.perf_counter()
    if cli(["import-hf", str(hf_dir), f"precision.params_dtype={dtype}", *p["overrides"], "--out", str(out)]) != 0:
        raise RuntimeError(f"import-hf failed for {name}")
    _free_memory()  # the model import-hf built is gone: the teacher below is built anew from its checkpoint
    t2 = time.perf_counter()
    cfg = load_teacher_config(out / "teacher.yaml", [f"engine.k={p['k']}"])
    init_model_parallel(cfg.model)
    engine = build_engine(cfg)
    payload = engine.score(tokens)
    consistency = check_consistency(engine, [tokens])
    t3 = time.perf_counter()
    ids = payload.indices.long()
    ours = payload.log_probs()
    theirs = ref.gather(-1, ids)
    delta = (ours - theirs).abs()
    hf_top = ref.topk(p["k"], dim=-1).indices
    overlap = (ids.unsqueeze(-1) == hf_top.unsqueeze(-2)).any(-1).float().mean().item()
    entropy = -(ref.exp() * ref).sum(-1).mean().item()
    result = dict(
        model=name, family=spec[0], params=sum(p.numel() for p in engine.model.parameters()),
        layer_spec=cfg.model.layer_spec, dtype=dtype, tokens=tokens.numel(), k=p["k"],
        max_abs_delta_logprob=delta.max().item(), mean_abs_delta_logprob=delta.mean().item(),
        top1_max_abs_delta_logprob=delta[..., 0].max().item(),
        top1_agreement=(ids[..., 0] == ref.argmax(-1)).float().mean().item(), topk_id_overlap=overlap,
        hf_mean_entropy_nats=entropy, hf_mean_top1_prob=ref.max(-1).values.exp().mean().item(),
        teacher_vs_training_bitwise=consistency.bitwise_equal and consistency.payload_bitwise_equal,
        teacher_vs_training_max_abs_logprob_diff=consistency.max_abs_logprob_diff,
        seconds=dict(make_and_hf_forward=t1 - t0, import_hf=t2 - t1, load_and_score=t3 - t2),
    )
    del engine, ref
    _free_memory()
    shutil.rmtree(hf_dir, ignore_errors=True)
    shutil.rmtree(out, ignore_errors=True)
    return result


def _free_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="gpu" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--models", help="comma-separated subset of the preset's models")
    ap.add_argument("--dtype", choices=["bfloat16", "float32"], default="bfloat16",
                    help="weights and both forwards (float32: the control, where only rounding order differs)")
    ap.add_argument("--workdir", help="where checkpoints are written (default: a temporary directory)")
    ap.add_argument("--out", help="write the result JSON here")
    args = ap.parse_args()
    p = PRESETS[args.preset]
    names = args.models.split(",") if args.models else list(p["models"])
    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="hf_gap_"))
    results = []
    for name in names:
        results.append(measure(name, p["models"][name], p, workdir, args.dtype))
        doc = dict(benchmark="hf_gap", preset=args.preset, date=time.strftime("%Y-%m-%d"), torch=torch.__version__,
                   device=torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu", logit_scale=LOGIT_SCALE,
                   batch=p["batch"], seq=p["seq"], results=results)
        if args.out:
            Path(args.out).write_text(json.dumps(doc, indent=2) + "\n")
    print(json.dumps(doc, indent=2))
    print(f"\n{'model':28} {'max|dlogp|':>11} {'mean|dlogp|':>12} {'top-1 agree':>12} {'top-k overlap':>14} "
          f"{'teacher=train':>14}")
    for r in results:
        print(f"{r['model']:28} {r['max_abs_delta_logprob']:11.3g} {r['mean_abs_delta_logprob']:12.3g} "
              f"{r['top1_agreement']:12.4f} {r['topk_id_overlap']:14.4f} "
              f"{'bitwise' if r['teacher_vs_training_bitwise'] else 'DIFFERS':>14}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
