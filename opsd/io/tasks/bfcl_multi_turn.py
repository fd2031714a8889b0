"""BFCL v4 multi-turn tasks from the installed `bfcl-eval` package (no download).

    from opsd.io.tasks import load_tasks
    tasks = load_tasks("bfcl:multi_turn_base:heldout")       # routed here by opsd.io.tasks.bfcl
    from opsd.io.tasks import bfcl_multi_turn as mt
    entry = mt.entry("multi_turn_base_12")                    # the raw BFCL item + its ground truth
    env = mt.environment(entry)                               # its simulated APIs, initial state loaded

A multi-turn task is a scripted conversation over BFCL's simulated APIs (`opsd.io.tasks.bfcl_env`):
several user turns, each with ground-truth calls (BFCL executable strings such as
`cd(folder='document')`). The `Task` holds the first turn's messages and the tools declared from
the start; `meta["multi_turn"]` holds what the agent loop (`opsd.rollout.multi_turn`) needs:

- `bfcl_id`: the BFCL item id; the environment and its initial state always come from the
  installed wheel by this id (never from a log);
- `turns`: the user messages of every turn (turn 0 included);
- `ground_truth`: the ground-truth calls of every turn (`[]`: the model should not call, e.g. a
  missing parameter in `multi_turn_miss_param`);
- `added_tools`: {turn index (str): [OpenAI tools]}, functions BFCL holds out until that turn
  (`multi_turn_miss_func`); at that turn the user message lists them, as BFCL does for prompted models.

Categories (`CATEGORIES`): `multi_turn_base`, `multi_turn_miss_func`, `multi_turn_miss_param`,
`multi_turn_long_context` (200 scenarios each). Left out (`LEFT_OUT`): `web_search_*` (needs the
network), `memory_*` (files on disk, prerequisite conversations, a downloaded embedding model) and
`multi_turn_composite` (not shipped in the wheel).

Splits. The four categories are variants of the same 200 scenarios (`multi_turn_X_N` is scenario
N), so a scenario's split comes from a hash of its base question (all user turns of
`multi_turn_base_N`, normalised as in `opsd.io.tasks.bfcl`): every variant of a scenario, and
every scenario with the same question, lands in the same split (`train` ~45%, `validation` ~15%,
`heldout` ~40%). No multi-turn question occurs in the single-turn categories.
"""
from __future__ import annotations

import builtins
import json
import keyword
import re
import uuid
from functools import cache

from opsd.io.tasks import bfcl
from opsd.io.tasks.bfcl_env import SIMULATED_CLASSES, Environment, call_string
from opsd.types import Task

CATEGORIES = ("multi_turn_base", "multi_turn_miss_func", "multi_turn_miss_param", "multi_turn_long_context")
LEFT_OUT = {
    "web_search_base": "needs the network (SerpAPI search and page fetches)",
    "web_search_no_snippet": "needs the network (SerpAPI search and page fetches)",
    "memory_kv": "memory files on disk and prerequisite conversations",
    "memory_vector": "downloads a sentence-transformers model; memory files on disk",
    "memory_rec_sum": "memory files on disk and prerequisite conversations",
    "multi_turn_composite": "not shipped in the bfcl-eval wheel",
}
# BFCL's user turn when held-out functions become available (constants.default_prompts, prompting variant)
ADDED_FUNCTIONS_PROMPT = "I have updated some more functions you can choose from. What about now?"
_ID_RE = re.compile(r"^(multi_turn_[a-z_]+?)_(\d+)$")


def is_category(name: str) -> bool:
    return name in CATEGORIES


def owns(category: str) -> bool:
    """Whether `category` is a multi-turn one this module loads (or refuses with the reason: `LEFT_OUT`)."""
    return category.startswith(("multi_turn_", "web_search_", "memory_"))


def _check_category(category: str) -> None:
    if category in LEFT_OUT:
        raise ValueError(f"BFCL category {category!r} is not supported: {LEFT_OUT[category]}")
    if category not in CATEGORIES:
        raise ValueError(f"unknown BFCL multi-turn category {category!r}; choose from {', '.join(CATEGORIES)}")


@cache
def _items(category: str) -> dict[str, dict]:
    d = bfcl.data_dir()
    items = {x["id"]: x for x in bfcl._read_jsonl(d / f"BFCL_v4_{category}.json")}
    answers = {a["id"]: a["ground_truth"] for a in bfcl._read_jsonl(d / "possible_answer" / f"BFCL_v4_{category}.json")}
    for tid, x in items.items():
        if tid not in answers:
            raise ValueError(f"BFCL item {tid} has no possible answer in the installed data")
        if len(answers[tid]) != len(x["question"]):
            raise ValueError(f"BFCL item {tid}: {len(x['question'])} turns but {len(answers[tid])} ground-truth turns")
        x["ground_truth"] = answers[tid]
    return items


@cache
def function_docs(cls: str) -> tuple[dict, ...]:
    """BFCL's function documentation of one simulated class (as shipped, BFCL types)."""
    from bfcl_eval.constants.executable_backend_config import (
        MULTI_TURN_FUNC_DOC_FILE_MAPPING,
    )

    if cls not in SIMULATED_CLASSES:
        raise ValueError(f"class {cls!r} is not one of the simulated classes {', '.join(SIMULATED_CLASSES)}")
    path = bfcl.data_dir() / "multi_turn_func_doc" / MULTI_TURN_FUNC_DOC_FILE_MAPPING[cls]
    return tuple(bfcl._read_jsonl(path))


def category_of(bfcl_id: str) -> str:
    m = _ID_RE.match(bfcl_id)
    if not m or m.group(1) not in CATEGORIES:
        raise ValueError(f"{bfcl_id!r} is not the id of a BFCL multi-turn task ({', '.join(CATEGORIES)})")
    return m.group(1)


def entry(bfcl_id: str) -> dict:
    """The BFCL item `bfcl_id` as shipped, with its per-turn `ground_truth` (a deep copy: safe to modify)."""
    item = _items(category_of(bfcl_id)).get(bfcl_id)
    if item is None:
        raise ValueError(f"{bfcl_id!r} is not in the installed BFCL data")
    return json.loads(json.dumps(item))


def declared_functions(item: dict) -> tuple[list[dict], dict[str, list[dict]]]:
    """(functions declared from the start, {turn (str): functions added at that turn}) in BFCL types.

    As BFCL's `populate_test_cases_with_predefined_functions`: every function of the involved
    classes, minus the ones `missed_function` holds out until a later turn.
    """
    funcs = [dict(f) for cls in item["involved_classes"] for f in function_docs(cls)]
    added: dict[str, list[dict]] = {}
    for turn, names in (item.get("missed_function") or {}).items():
        added[str(turn)] = []
        for name in names:
            k = next((i for i, f in enumerate(funcs) if f["name"] == name), None)
            if k is not None:
                added[str(turn)].append(funcs.pop(k))
    return funcs, added


def is_long_context(bfcl_id: str) -> bool:
    return "long_context" in category_of(bfcl_id)


def environment(item: dict, *, call_seconds: float | None = 10.0) -> Environment:
    """The simulated APIs of a BFCL item, its initial state loaded; only the functions declared from the
    start are callable (`Environment.allow` adds the held-out ones at their turn)."""
    funcs, _ = declared_functions(item)
    return Environment(item["involved_classes"], item.get("initial_config") or {},
                       long_context=is_long_context(item["id"]), tools=[f["name"] for f in funcs],
                       call_seconds=call_seconds)


def turn_messages(item: dict, turn: int, added: dict[str, list[dict]]) -> list[dict]:
    """The user messages that open `turn` (a held-out-functions turn: the functions, then BFCL's prompt)."""
    msgs = [{"role": m["role"], "content": m["content"]} for m in item["question"][turn]]
    if str(turn) in added and not msgs:
        tools = [bfcl.to_openai_tool(f) for f in added[str(turn)]]
        msgs = [{"role": "user", "content": json.dumps(tools, ensure_ascii=False) + "\n" + ADDED_FUNCTIONS_PROMPT}]
    return msgs


def to_task(item: dict, category: str) -> Task:
    funcs, added = declared_functions(item)
    turns = [turn_messages(item, k, added) for k in range(len(item["question"]))]
    meta = {"source": "bfcl", "category": category, "multi_turn": {
        "bfcl_id": item["id"], "turns": turns, "ground_truth": item["ground_truth"],
        "involved_classes": item["involved_classes"],
        "added_tools": {t: [bfcl.to_openai_tool(f) for f in fs] for t, fs in added.items()}}}
    return Task(item["id"], turns[0], [bfcl.to_openai_tool(f) for f in funcs], None, meta)


def scenario_question(n: int) -> str:
    """The normalised question of scenario n: every user turn of `multi_turn_base_n`."""
    return bfcl.normalise_question(bfcl.question_text(_items("multi_turn_base")[f"multi_turn_base_{n}"]))


def split_of(bfcl_id: str) -> str:
    """'train', 'validation' or 'heldout' (see the module docstring)."""
    category_of(bfcl_id)
    n = int(_ID_RE.match(bfcl_id).group(2))
    return bfcl.split_of_question(scenario_question(n))


def load(category: str, split: str = "all") -> list[Task]:
    """Tasks of one multi-turn category in file order, filtered to `split`."""
    _check_category(category)
    if split not in bfcl.SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {', '.join(bfcl.SPLITS)}")
    return [to_task(json.loads(json.dumps(item)), category) for tid, item in _items(category).items()
            if split == "all" or split_of(tid) == split]


def is_multi_turn(meta: dict) -> bool:
    """Whether a task's or trajectory's meta describes a BFCL multi-turn episode."""
    return isinstance(meta.get("multi_turn"), dict) and "bfcl_id" in meta["multi_turn"]


# ----------------------------------------------------------------------------- BFCL's official verdict
def turn_starts(messages: list[dict], meta: dict) -> list[int]:
    """Index of the first user message of each played turn: `meta.multi_turn.turn_starts` when valid, else each
    run of user messages opens a turn."""
    starts = (meta.get("multi_turn") or {}).get("turn_starts")
    if isinstance(starts, list) and starts and starts == sorted(set(starts)) and all(
            isinstance(s, int) and 0 <= s < len(messages) and messages[s].get("role") == "user" for s in starts):
        return starts
    return [i for i, m in enumerate(messages)
            if m.get("role") == "user" and (i == 0 or messages[i - 1].get("role") != "user")]


UNDEFINED = "opsd_undefined_function"


def checkable_name(name, methods) -> str | None:
    """The function name to hand to BFCL's checker (which `eval`s `name(...)`): a method of the task's classes
    as is; any other plain identifier as itself when BFCL's `eval` can only raise NameError on it (as it does
    for a made-up name), else as `UNDEFINED` (a builtin such as `open` must never run); None for a name that
    is not an identifier (the step is then undecodable, as for BFCL's decoder)."""
    from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_utils

    if name in methods:
        return name
    if not (isinstance(name, str) and name.isidentifier()) or keyword.iskeyword(name):
        return None
    if name.startswith("_") or hasattr(builtins, name) or name in vars(multi_turn_utils):
        return UNDEFINED
    return name


def decoded_turns(messages: list[dict], meta: dict) -> list[list[list[str]]]:
    """The model's calls as BFCL's checker takes them: per turn, per step, `name(k=v)` strings.

    As BFCL's decoder: a step whose calls do not all parse (or that has none) is left out, and so is a
    step with a call whose name is not an identifier or whose arguments are not plain JSON. Names go
    through `checkable_name`: nothing but a simulated method (or a NameError) can come of BFCL's `eval`.
    """
    item = entry(meta["multi_turn"]["bfcl_id"])
    methods = environment(item, call_seconds=None)._owner
    starts = turn_starts(messages, meta)
    out = []
    for a, b in zip(starts, starts[1:] + [len(messages)]):
        steps = []
        for m in messages[a:b]:
            if m.get("role") != "assistant" or not m.get("tool_calls") or m.get("parse_error"):
                continue
            strings = []
            for c in m["tool_calls"]:
                fn = c.get("function") or {}
                try:
                    args = json.loads(fn.get("arguments") or "{}")
                except (json.JSONDecodeError, TypeError):
                    args = None
                s = call_string(checkable_name(fn.get("name"), methods), args)
                if s is None:
                    break
                strings.append(s)
            else:
                steps.append(strings)
        out.append(steps)
    return out


def official_check(messages: list[dict], meta: dict) -> dict:
    """BFCL's verdict on one multi-turn trajectory: {"valid": bool, "error_type"?, "error_message"?}.

    Runs `bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker.multi_turn_checker` itself (as
    BFCL's eval runner does: an episode with fewer turns than the ground truth was force-terminated).
    """
    from bfcl_eval.eval_checker.multi_turn_eval import multi_turn_utils
    from bfcl_eval.eval_checker.multi_turn_eval.multi_turn_checker import (
        multi_turn_checker,
    )

    item = entry(meta["multi_turn"]["bfcl_id"])
    decoded = decoded_turns(messages, meta)
    if len(decoded) != len(item["ground_truth"]):
        return {"valid": False, "error_type": "multi_turn:force_terminated",
                "error_message": f"{len(decoded)} turns played of {len(item['ground_truth'])}"}
    name = "opsd_" + uuid.uuid4().hex[:12]  # BFCL keeps instances in module globals keyed by model name
    try:
        out = multi_turn_checker(decoded, item["ground_truth"], item, category_of(item["id"]), name)
    finally:
        for k in [k for k in vars(multi_turn_utils) if k.startswith(name)]:
            delattr(multi_turn_utils, k)
    return {k: out[k] for k in ("valid", "error_type", "error_message") if k in out}
