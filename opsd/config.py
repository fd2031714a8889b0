"""One mapping for every command: a stage's Config dataclass <-> command-line flags <-> YAML.

Flags are generated from the dataclass by `tyro` (help text from `field(metadata={"help": ...})`,
checks from `__post_init__`, nested Configs as dotted flags: `--train.lr 5e-5`; `--lora-r` and
`--lora_r` both work). A YAML file given with `--config FILE` maps onto the same fields and is
turned into the same flags, placed BEFORE the command line's own flags, so values are typed the
same way (`lr: 1e-5` is a float, not a string) and the rule is one and the same everywhere:

    field default  <  --config FILE (YAML)  <  flags on the command line

    cfg = parse(TrainConfig, ["--config", "cfg.yaml", "--lr", "5e-5"], prog="opsd train")
    print(to_yaml(cfg))
"""
from __future__ import annotations

import dataclasses
import math
import sys
import typing
from pathlib import Path
from typing import Any, TypeVar

import tyro
import yaml

C = TypeVar("C")
CONFIG_FLAG = "--config"


class ConfigError(ValueError):
    """A config file that cannot be used (unknown key, wrong shape); the message names the file and key."""


def _hints(cls) -> dict[str, Any]:
    return typing.get_type_hints(cls, include_extras=False)


def _positional(cls) -> set[str]:
    """Fields annotated `tyro.conf.Positional` (given without a flag: `opsd validate FILE...`)."""
    hints = typing.get_type_hints(cls, include_extras=True)
    return {name for name, tp in hints.items()
            if typing.get_origin(tp) is typing.Annotated and any(m is tyro.conf.Positional for m in tp.__metadata__)}


def _is_config(tp) -> bool:
    return isinstance(tp, type) and dataclasses.is_dataclass(tp)


def flag_names(cls, prefix: str = "") -> list[str]:
    """Every leaf field of `cls` as its flag name (`--train.lora-r`), nested Configs included; positional fields
    are not flags and are left out."""
    out = []
    hints = _hints(cls)
    positional = _positional(cls)
    for f in dataclasses.fields(cls):
        if not f.init or f.name in positional:
            continue
        if _is_config(hints[f.name]):
            out += flag_names(hints[f.name], f"{prefix}{f.name}.")
        else:
            out.append("--" + (prefix + f.name).replace("_", "-"))
    return out


def _scalar(value) -> str:
    if value is None:
        return "None"
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return str(value)


def yaml_to_flags(cls, data: dict, *, source: str, prefix: str = "") -> list[str]:
    """Flags that set the fields of `cls` named in `data` (a parsed YAML mapping); unknown keys raise ConfigError."""
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: {prefix.rstrip('.') or 'the file'}: expected a mapping of config fields, "
                          f"got {type(data).__name__}")
    hints = _hints(cls)
    known = {f.name: f for f in dataclasses.fields(cls) if f.init}
    positional = _positional(cls)
    flags: list[str] = []
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise ConfigError(f"{source}: unknown key {prefix + str(key)!r}; valid keys: "
                              f"{', '.join(prefix + k for k in known)}")
        tp = hints[name]
        flag = "--" + prefix + name
        if name in positional:
            flags += [_scalar(v) for v in value] if isinstance(value, (list, tuple)) else [_scalar(value)]
        elif _is_config(tp):
            flags += yaml_to_flags(tp, value if value is not None else {}, source=source, prefix=f"{prefix}{name}.")
        elif isinstance(value, bool):
            flags.append(flag if value else "--" + prefix + "no_" + name)
        elif isinstance(value, dict):
            flags += [flag] + [tok for k, v in value.items() for tok in (str(k), _scalar(v))]
        elif isinstance(value, (list, tuple)):
            flags += [flag] + [_scalar(v) for v in value]
        else:
            flags.append(f"{flag}={_scalar(value)}")  # `=` keeps values like -inf or "-x" from reading as flags
    return flags


def split_config_flag(argv: list[str]) -> tuple[list[str], list[str]]:
    """(config files, remaining argv): `--config FILE` / `--config=FILE` may appear anywhere, several times."""
    files, rest, i = [], [], 0
    while i < len(argv):
        a = argv[i]
        if a == CONFIG_FLAG:
            if i + 1 >= len(argv):
                raise ConfigError(f"{CONFIG_FLAG} needs a YAML file")
            files.append(argv[i + 1])
            i += 2
            continue
        if a.startswith(CONFIG_FLAG + "="):
            files.append(a.split("=", 1)[1])
        else:
            rest.append(a)
        i += 1
    return files, rest


def load_yaml(cls, path: str | Path) -> list[str]:
    """The flags of one YAML config file for `cls`."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"{path}: config file not found" + (" (it is a directory)" if p.is_dir() else ""))
    try:
        data = yaml.safe_load(p.read_text("utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    return yaml_to_flags(cls, data, source=str(path))


def parse(cls: type[C], argv: list[str] | None = None, *, prog: str, description: str = "") -> C:
    """Build `cls` from YAML files given with --config (in order) and then the flags; exits 2 on a usage error."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        files, rest = split_config_flag(argv)
        from_yaml = [flag for f in files for flag in load_yaml(cls, f)]
    except ConfigError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    description = (description + "\n\n" if description else "") + (
        f"Any flag can also come from a YAML file: {CONFIG_FLAG} FILE (keys are the field names, nested as "
        "mappings); flags on the command line override it.")
    cfg = tyro.cli(cls, args=from_yaml + rest, prog=prog, description=description, use_underscores=False)
    _decode_escape_fields(cfg)
    return cfg


def decode_escapes(text: str | None) -> str | None:
    """A value typed in a shell: backslash escapes (`\\n`, `\\t`) become characters, other text (non-ASCII
    included) stays as it is."""
    if text is None:
        return None
    return text.encode("latin-1", "backslashreplace").decode("unicode_escape")


def _decode_escape_fields(cfg) -> None:
    """Fields marked `metadata={"escapes": True}` (reply prefills, instructions) get their escapes decoded,
    in nested Configs too: `--rollout.prefill '<tool_call>\\n'` means a real newline, as in YAML."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        if dataclasses.is_dataclass(value):
            _decode_escape_fields(value)
        elif f.metadata.get("escapes") and isinstance(value, str):
            object.__setattr__(cfg, f.name, decode_escapes(value))


def to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def to_yaml(cfg) -> str:
    """The config as YAML that `--config` reads back to the same values."""
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, allow_unicode=True)
