"""opsd.config: flags generated from each stage Config, YAML < flags, typed YAML, escapes; every field has a flag."""
from __future__ import annotations

import dataclasses
import importlib
import os
import subprocess
import sys

import pytest

from opsd.cli import COMMANDS, CONFIGS
from opsd.config import ConfigError, _positional, flag_names, parse, to_yaml, yaml_to_flags
from opsd.pipelines.loop import LoopConfig
from opsd.train.config import TrainConfig
from tests.conftest import ROOT


def config_class(path: str):
    module, _, name = path.partition(":")
    return getattr(importlib.import_module(module), name)


def test_yaml_is_typed_and_flags_override_it_in_any_order(tmp_path):
    y = tmp_path / "c.yaml"
    y.write_text("lr: 1e-5\nprogress: false\nmin_hint_effect: -.inf\nbatch_size: 3\n")
    for argv in (["--config", str(y), "--lr", "3e-5"], ["--lr", "3e-5", "--config", str(y)], [f"--config={y}", "--lr=3e-5"]):
        cfg = parse(TrainConfig, argv, prog="t")
        assert cfg.lr == 3e-5 and cfg.progress is False and cfg.min_hint_effect == float("-inf") and cfg.batch_size == 3
    assert parse(TrainConfig, ["--config", str(y)], prog="t").lr == 1e-5  # a float, not the string "1e-5"


def test_nested_yaml_and_dotted_flags(tmp_path):
    y = tmp_path / "loop.yaml"
    y.write_text("rounds: 4\ntrain:\n  lr: 2e-5\nrollout:\n  limit: 7\ncritic:\n  name: schema\n")
    cfg = parse(LoopConfig, ["--config", str(y), "--train.lr", "5e-5", "--rollout.max_new_tokens", "40"], prog="l")
    assert (cfg.rounds, cfg.train.lr, cfg.rollout.limit, cfg.rollout.max_new_tokens, cfg.critic.name) == \
        (4, 5e-5, 7, 40, "schema")


def test_unknown_yaml_keys_name_the_file_and_key(tmp_path):
    y = tmp_path / "bad.yaml"
    y.write_text("train:\n  lrr: 1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: unknown key 'train.lrr'"):
        yaml_to_flags(LoopConfig, {"train": {"lrr": 1}}, source=str(y))
    with pytest.raises(SystemExit) as e:
        parse(LoopConfig, ["--config", str(y)], prog="opsd loop")
    assert e.value.code == 2


def test_escapes_in_prefills_become_characters():
    cfg = parse(LoopConfig, ["--rollout.prefill", "<tool_call>\\n", "--train.teacher-system", "a\\tb é"], prog="l")
    assert cfg.rollout.prefill == "<tool_call>\n" and cfg.train.teacher_system == "a\tb é"
    assert parse(LoopConfig, [], prog="l").rollout.prefill is None  # None stays "the model's own"


def test_to_yaml_round_trips(tmp_path):
    cfg = parse(LoopConfig, ["--train.lr", "7e-5", "--rounds", "5", "--no-fresh-tasks"], prog="l")
    y = tmp_path / "back.yaml"
    y.write_text(to_yaml(cfg))
    assert parse(LoopConfig, ["--config", str(y)], prog="l") == cfg


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_every_config_field_has_a_flag(command):
    cls = config_class(CONFIGS[command])
    env = {**os.environ, "COLUMNS": "400"}
    out = subprocess.run([sys.executable, "-m", "opsd.cli", command, "--help"], capture_output=True, text=True,
                         cwd=ROOT, env=env)
    assert out.returncode == 0, out.stderr
    missing = [f for f in flag_names(cls) if f not in out.stdout]
    assert missing == []
    for f in dataclasses.fields(cls):  # a positional argument is listed with its help text
        if f.name in _positional(cls):
            assert f.metadata["help"][:30] in out.stdout


def test_positional_fields_come_from_yaml_too(tmp_path):
    from opsd.logs import ValidateConfig

    y = tmp_path / "v.yaml"
    y.write_text("inputs: [a.jsonl, b.jsonl]\nrejects: r.jsonl\n")
    cfg = parse(ValidateConfig, ["--config", str(y)], prog="v")
    assert cfg.inputs == ["a.jsonl", "b.jsonl"] and cfg.rejects == "r.jsonl"
    assert parse(ValidateConfig, ["c.jsonl"], prog="v").inputs == ["c.jsonl"]


def test_every_command_has_a_config():
    assert set(CONFIGS) == set(COMMANDS)
