"""Hugging Face checkpoints as teachers: config.json -> `ModelConfig`, safetensors -> Megatron-Core weights.

`TeacherEngine.from_hf(path)` loads one directly; `kd-teacher import-hf PATH --out DIR` converts it once into a
Megatron-Core distributed checkpoint plus a teacher YAML. See docs/hf_teachers.md.
"""
