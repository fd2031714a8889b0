"""BFCL v4 single-turn tasks from the installed `bfcl-eval` package (no download).

    from opsd.io.tasks import bfcl
    tasks = bfcl.load("simple_python", split="train")

Each item becomes prompt messages + OpenAI tools whose parameters are valid JSON Schema
(BFCL's dict->object, float->number, tuple->array, any->no type), with the possible answers
as ground truth. The train/held-out split hashes the BFCL id, so it is stable across versions
and machines and never depends on file order.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
from pathlib import Path

from opsd.io.tasks import Task

CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple",
              "live_simple", "live_multiple", "live_parallel", "live_parallel_multiple")
SPLITS = ("train", "heldout", "all")
HELDOUT_FRACTION = 0.5
_TYPE_MAP = {"dict": "object", "float": "number", "tuple": "array"}
INSTALL_HINT = "pip install --no-deps bfcl-eval==2026.3.23"


def data_dir() -> Path:
    spec = importlib.util.find_spec("bfcl_eval")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"BFCL tasks need the 'bfcl-eval' package; install it with:\n    {INSTALL_HINT}")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def to_json_schema(s):
    """Convert a BFCL parameter schema (recursively) to JSON Schema."""
    if isinstance(s, list):
        return [to_json_schema(x) for x in s]
    if not isinstance(s, dict):
        return s
    out = {}
    for k, v in s.items():
        if k == "type" and isinstance(v, str):
            if v == "any":
                continue
            out[k] = _TYPE_MAP.get(v, v)
        elif k == "properties" and isinstance(v, dict):
            out[k] = {name: to_json_schema(p) for name, p in v.items()}
        elif k in ("items", "additionalProperties", "anyOf", "oneOf", "allOf"):
            out[k] = to_json_schema(v)
        elif k == "optional":
            continue  # not a JSON Schema keyword; optionality is expressed by "required"
        else:
            out[k] = copy.deepcopy(v)
    return out


def to_openai_tool(fn: dict) -> dict:
    params = to_json_schema(fn.get("parameters") or {"type": "object", "properties": {}})
    params.setdefault("type", "object")
    return {"type": "function", "function": {"name": fn["name"], "description": fn.get("description", ""),
                                             "parameters": params}}


def split_of(task_id: str, heldout_fraction: float = HELDOUT_FRACTION) -> str:
    """'train' or 'heldout', from a hash of the id (deterministic, order independent)."""
    h = int.from_bytes(hashlib.sha256(task_id.encode()).digest()[:8], "big") / 2**64
    return "heldout" if h < heldout_fraction else "train"


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load(category: str, split: str = "all", heldout_fraction: float = HELDOUT_FRACTION) -> list[Task]:
    """Tasks of one BFCL category in file order, filtered to `split`."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown BFCL category {category!r}; choose from {', '.join(CATEGORIES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    d = data_dir()
    answers = {a["id"]: a["ground_truth"] for a in _read_jsonl(d / "possible_answer" / f"BFCL_v4_{category}.json")}
    tasks = []
    for item in _read_jsonl(d / f"BFCL_v4_{category}.json"):
        if split != "all" and split_of(item["id"], heldout_fraction) != split:
            continue
        if item["id"] not in answers:
            raise ValueError(f"BFCL item {item['id']} has no possible answer in the installed data")
        messages = [{"role": m["role"], "content": m["content"]} for m in item["question"][0]]
        tools = [to_openai_tool(fn) for fn in item["function"]]
        tasks.append(Task(item["id"], messages, tools, answers[item["id"]],
                          {"source": "bfcl", "category": category}))
    return tasks


def load_spec(spec: str) -> list[Task]:
    """`bfcl:CAT[,CAT...][:train|:heldout|:all]` -> tasks (categories in the order given)."""
    parts = spec.split(":")
    if len(parts) not in (2, 3) or parts[0] != "bfcl" or not parts[1]:
        raise ValueError(f"bad task spec {spec!r}; expected bfcl:CATEGORY[,CATEGORY...][:train|:heldout|:all]")
    split = parts[2] if len(parts) == 3 else "all"
    return [t for cat in parts[1].split(",") for t in load(cat, split)]
