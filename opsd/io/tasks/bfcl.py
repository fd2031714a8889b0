"""BFCL v4 single-turn tasks from the installed `bfcl-eval` package (no download).

    from opsd.io.tasks import bfcl
    tasks = bfcl.load("multiple", split="train")
    bfcl.split_report()        # how many tasks each split holds and how many duplicates were dropped

Each item becomes prompt messages + OpenAI tools whose parameters are valid JSON Schema
(BFCL's dict->object, float->number, tuple->array, any->no type), with the possible answers
as ground truth.

Splits are leak-free across ALL categories. BFCL repeats questions across categories (97
`simple_python` questions reappear verbatim in `multiple` with more tools) and within them.
So the split is decided per normalised question (lowercase, punctuation and whitespace runs
collapsed to one space), from a hash of that text: every task with the same question lands in the same
split, whatever its category, its id or the file order. Then one task per normalised
question is kept (the one offering the most tools, then the first category in `CATEGORIES`,
then the first in file order); the others are dropped from `train`, `validation` and
`heldout` (and counted in `split_report()`). `all` is every item as shipped. Hence no two
tasks of the three splits share a question, nor a question plus function set.

- `train` (~45%): what rollouts and training use;
- `validation` (~15%): for choosing hyperparameters and rounds;
- `heldout` (~40%): only ever scored, never used to choose.
"""
from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import re
from collections import Counter
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from opsd.types import Task

CATEGORIES = ("simple_python", "multiple", "parallel", "parallel_multiple",
              "live_simple", "live_multiple", "live_parallel", "live_parallel_multiple")
SPLITS = ("train", "validation", "heldout", "all")
HELDOUT_FRACTION = 0.40
VALIDATION_FRACTION = 0.15  # train gets the rest (0.45)
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


def normalise_question(text: str) -> str:
    """Question text for duplicate detection: lowercase, non-word runs -> one space, stripped."""
    return " ".join(re.sub(r"[\W_]+", " ", text.lower()).split())


def question_text(item: dict) -> str:
    """The user turns of a BFCL item (system boilerplate left out), joined by newlines."""
    return "\n".join(m["content"] for turn in item["question"] for m in turn if m.get("role") == "user")


def split_of_question(normalised: str) -> str:
    """'heldout', 'validation' or 'train', from a hash of the normalised question."""
    h = int.from_bytes(hashlib.sha256(normalised.encode()).digest()[:8], "big") / 2**64
    if h < HELDOUT_FRACTION:
        return "heldout"
    return "validation" if h < HELDOUT_FRACTION + VALIDATION_FRACTION else "train"


@dataclass(frozen=True)
class SplitIndex:
    """Every BFCL item's split ('train' | 'validation' | 'heldout' | 'dropped') and why items were dropped."""

    split: dict  # {task id: split}
    kept_instead: dict  # {dropped task id: the id kept for the same question}
    question: dict  # {task id: normalised question}
    category: dict  # {task id: BFCL category}


@lru_cache(maxsize=None)
def split_index() -> SplitIndex:
    """Splits of every item of every category in `CATEGORIES` (computed once per process)."""
    groups: dict[str, list[tuple[int, int, str, int]]] = {}
    category = {}
    d = data_dir()
    for c_rank, cat in enumerate(CATEGORIES):
        for pos, item in enumerate(_read_jsonl(d / f"BFCL_v4_{cat}.json")):
            q = normalise_question(question_text(item))
            groups.setdefault(q, []).append((-len(item["function"]), c_rank, item["id"], pos))
            category[item["id"]] = cat
    split, kept_instead, question = {}, {}, {}
    for q, members in groups.items():
        members.sort(key=lambda m: (m[0], m[1], m[3]))  # most tools, then category order, then file order
        keep = members[0][2]
        s = split_of_question(q)
        for m in members:
            question[m[2]] = q
            if m[2] == keep:
                split[m[2]] = s
            else:
                split[m[2]], kept_instead[m[2]] = "dropped", keep
    return SplitIndex(split, kept_instead, question, category)


def split_of(task_id: str) -> str:
    """The split of a BFCL task id: 'train', 'validation', 'heldout' or 'dropped' (a duplicate question)."""
    try:
        return split_index().split[task_id]
    except KeyError:
        raise ValueError(f"{task_id!r} is not a task of the BFCL categories {', '.join(CATEGORIES)}") from None


def split_report() -> dict:
    """Counts per split and category, and the duplicates dropped (by category, and how many crossed categories)."""
    idx = split_index()
    cat_of = idx.category
    per = {s: dict(Counter(cat_of[t] for t, x in idx.split.items() if x == s))
           for s in ("train", "validation", "heldout", "dropped")}
    cross = sum(1 for t, k in idx.kept_instead.items() if cat_of[t] != cat_of[k])
    return {"items": len(idx.split), "questions": len(set(idx.question.values())),
            "per_split": {s: {"n": sum(v.values()), "by_category": v} for s, v in per.items()},
            "dropped": len(idx.kept_instead), "dropped_duplicate_of_other_category": cross}


def _read_jsonl(path: Path) -> list[dict]:
    with path.open(encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def load(category: str, split: str = "all") -> list[Task]:
    """Tasks of one BFCL category in file order, filtered to `split` (see the module docstring)."""
    if category not in CATEGORIES:  # multi-turn categories: opsd.io.tasks.bfcl_multi_turn.load
        raise ValueError(f"unknown BFCL category {category!r}; choose from {', '.join(CATEGORIES)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    d = data_dir()
    answers = {a["id"]: a["ground_truth"] for a in _read_jsonl(d / "possible_answer" / f"BFCL_v4_{category}.json")}
    splits = split_index().split if split != "all" else {}
    tasks = []
    for item in _read_jsonl(d / f"BFCL_v4_{category}.json"):
        if split != "all" and splits[item["id"]] != split:
            continue
        if item["id"] not in answers:
            raise ValueError(f"BFCL item {item['id']} has no possible answer in the installed data")
        messages = [{"role": m["role"], "content": m["content"]} for m in item["question"][0]]
        tools = [to_openai_tool(fn) for fn in item["function"]]
        tasks.append(Task(item["id"], messages, tools, answers[item["id"]],
                          {"source": "bfcl", "category": category}))
    return tasks


def _sample_rank(task_id: str) -> bytes:
    return hashlib.sha256(f"opsd-sample:{task_id}".encode()).digest()


def allocate(sizes: list[int], limit: int) -> list[int]:
    """Proportional allocation of `limit` over strata of `sizes` (largest remainder; ties to the earlier stratum)."""
    total = sum(sizes)
    if limit >= total:
        return list(sizes)
    quotas = [limit * s / total for s in sizes]
    out = [int(q) for q in quotas]
    order = sorted(range(len(sizes)), key=lambda i: (-(quotas[i] - out[i]), i))
    for i in order[:limit - sum(out)]:
        out[i] += 1
    return out


def stratified(per_category: list[list[Task]], limit: int) -> list[Task]:
    """A deterministic stratified sample of `limit` tasks: proportional per category, and within a category
    the tasks that rank first by a hash of their id (so a larger limit keeps what a smaller one took).
    Categories stay in the order given, tasks in file order."""
    counts = allocate([len(ts) for ts in per_category], limit)
    out = []
    for ts, k in zip(per_category, counts):
        chosen = {t.id for t in sorted(ts, key=lambda t: _sample_rank(t.id))[:k]}
        out += [t for t in ts if t.id in chosen]
    return out
