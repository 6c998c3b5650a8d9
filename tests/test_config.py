"""Strict YAML -> dataclass loading: unknown keys and wrong types are errors naming the dotted key."""

import pytest

from kd_teacher.config import ConfigError, apply_overrides, from_dict, load_config
from kd_teacher.engine.loading import TeacherConfig, load_teacher_config


def test_teacher_config_loads_with_overrides():
    cfg = load_teacher_config("configs/teacher_tiny.yaml", ["engine.k=8", "model.precision.params_dtype=bfloat16"])
    assert cfg.engine.k == 8 and cfg.model.precision.params_dtype == "bfloat16"
    assert cfg.model.padded_vocab_size == 1000


def test_unknown_key_names_the_path():
    with pytest.raises(ConfigError, match="model.hiden_size"):
        from_dict(TeacherConfig, {"model": {"hiden_size": 3}})


def test_wrong_type_and_literal():
    base = {"num_layers": 1, "hidden_size": 8, "num_attention_heads": 2, "vocab_size": 10, "max_sequence_length": 4}
    with pytest.raises(ConfigError, match="model.num_layers: expected an integer"):
        from_dict(TeacherConfig, {"model": {**base, "num_layers": "two"}})
    with pytest.raises(ConfigError, match="normalization"):
        from_dict(TeacherConfig, {"model": {**base, "normalization": "BatchNorm"}})


def test_overrides_parse_yaml_values():
    d = apply_overrides({}, ["a.b=3", "a.c=[1, 2]", "d=true"])
    assert d == {"a": {"b": 3, "c": [1, 2]}, "d": True}
    with pytest.raises(ConfigError, match="key=value"):
        apply_overrides({}, ["nonsense"])


def test_missing_file():
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(TeacherConfig, "configs/nope.yaml")


def test_the_one_loader_takes_a_section_merges_includes_and_resolves_paths_against_the_yaml(tmp_path, monkeypatch):
    from dataclasses import dataclass, field
    from typing import Optional

    from kd_teacher.config import PATH

    @dataclass
    class Inner:
        k: int
        where: Optional[str] = field(default=None, metadata=PATH)

    @dataclass
    class Outer:
        inner: Inner
        name: str = "x"

    (tmp_path / "inner.yaml").write_text("k: 3\nwhere: data\n")
    (tmp_path / "data").mkdir()
    (tmp_path / "run.yaml").write_text("block:\n  inner_config: inner.yaml\n  inner: {k: 4}\nother: 1\n")
    (tmp_path / "bare.yaml").write_text("block: {name: z}\n")
    monkeypatch.chdir("/")
    cfg = load_config(Outer, tmp_path / "run.yaml", ["block.name=y"], section="block")
    assert (cfg.inner.k, cfg.name, cfg.inner.where) == (4, "y", str(tmp_path / "data"))
    with pytest.raises(ConfigError, match="has no top-level `kd:` block"):
        load_config(Outer, tmp_path / "run.yaml", section="kd")
    with pytest.raises(ConfigError, match="missing required key\\(s\\) block.inner for Outer"):
        load_config(Outer, tmp_path / "bare.yaml", section="block")


def test_a_kd_source_that_is_not_one_of_the_three_is_named():
    from kd_teacher.hooks.config import KDConfig

    with pytest.raises(ConfigError, match="kd.source 'bogus' is not one of \\['in_process', 'offline', 'remote'\\]"):
        KDConfig(source="bogus", k=4).check()


def test_a_literal_word_that_yaml_reads_as_a_bool_is_taken_as_the_word(tmp_path):
    from kd_teacher.engine.engine import EngineConfig

    cfg = tmp_path / "e.yaml"
    cfg.write_text("repacking: off\n")
    assert load_config(EngineConfig, cfg).repacking == "off"
    assert load_config(EngineConfig, cfg, ["repacking=any"]).repacking == "any"
    with pytest.raises(ConfigError, match="True is not one of"):
        load_config(EngineConfig, cfg, ["repacking=on"])
