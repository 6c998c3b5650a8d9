"""Writes a small version-1 (pre-sampled-kind) top-k dump with the code on PYTHONPATH (main before issue 20)."""
import json, sys
from pathlib import Path
import torch
from kd_teacher.runtime import init_distributed
from kd_teacher.engine.engine import EngineConfig
from kd_teacher.engine.loading import TeacherConfig
from kd_teacher.engine.model import ModelConfig
from kd_teacher.offline.data import DataConfig, TokenizerConfig
from kd_teacher.offline.writer import DumpConfig, OutputConfig, run_dump
from kd_teacher.offline import format as fmt

out = Path(sys.argv[1])
init_distributed(1, 1)
g = torch.Generator().manual_seed(20)
rows = [torch.randint(0, 255, (16,), generator=g).tolist() for _ in range(6)]
jsonl = out / "tokens.jsonl"
out.mkdir(parents=True)
jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
model = ModelConfig(num_layers=1, hidden_size=32, num_attention_heads=2, num_query_groups=1, ffn_hidden_size=64,
                    vocab_size=256, max_sequence_length=32, make_vocab_size_divisible_by=8)
cfg = DumpConfig(teacher=TeacherConfig(model=model, engine=EngineConfig(k=4, temperature=2.0)),
                 data=DataConfig(kind="jsonl", path=str(jsonl), tokenizer=TokenizerConfig(vocab_size=256, eod=255, name="v1-fixture")),
                 output=OutputConfig(dir=str(out / "dump"), samples_per_shard=4, progress=False), allow_random_weights=True)
m = run_dump(cfg)
print(fmt.SCHEMA_VERSION, m.schema_version, m.num_shards, m.total_bytes)
