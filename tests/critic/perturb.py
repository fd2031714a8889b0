"""Model-like outputs built from BFCL ground truth with seeded perturbations (for agreement tests)."""
from __future__ import annotations

import copy
import json
import random

from opsd.types import Trajectory

KINDS = ("exact", "alt_value", "drop_param", "change_value", "wrong_name", "extra_param", "int_float",
         "string_variant", "stringify", "omit_optional", "reorder", "drop_call", "dup_call")


def _pick(vals: list, rng: random.Random, alt: bool = False):
    good = [v for v in vals if v != ""]
    if not good:
        return None
    return good[-1] if alt else good[0]


def gt_calls(gt: list[dict], rng: random.Random, *, alt=False, omit_optional=False) -> list[tuple[str, dict]]:
    calls = []
    for entry in gt:
        (name, params), = entry.items()
        args = {}
        for p, vals in params.items():
            if omit_optional and "" in vals:
                continue
            v = _pick(vals, rng, alt)
            if v is None:
                continue
            args[p] = copy.deepcopy(v)
        calls.append((name, args))
    return calls


def _change(v, rng):
    if isinstance(v, bool):
        return not v
    if isinstance(v, int):
        return v + rng.choice([1, -1, 10])
    if isinstance(v, float):
        return round(v * 1.5 + 1, 3)
    if isinstance(v, str):
        return v + " extra" if v else "something"
    if isinstance(v, list):
        return v[:-1] if v else [1]
    if isinstance(v, dict):
        return {}
    return "x"


def perturb(task, kind: str, rng: random.Random) -> list[tuple[str, dict]]:
    calls = gt_calls(task.ground_truth, rng, alt=(kind == "alt_value"), omit_optional=(kind == "omit_optional"))
    k = rng.randrange(len(calls))
    name, args = calls[k]
    keys = list(args)
    tool_names = [t["function"]["name"] for t in task.tools]
    if kind == "drop_param" and keys:
        del args[rng.choice(keys)]
    elif kind == "change_value" and keys:
        p = rng.choice(keys)
        args[p] = _change(args[p], rng)
    elif kind == "wrong_name":
        others = [n for n in tool_names if n != name]
        calls[k] = (rng.choice(others) if others and rng.random() < 0.5 else name + ".get", args)
    elif kind == "extra_param":
        args["extra_option"] = True
    elif kind == "int_float" and keys:
        p = rng.choice(keys)
        if isinstance(args[p], bool):
            pass
        elif isinstance(args[p], int):
            args[p] = float(args[p])
        elif isinstance(args[p], float) and args[p].is_integer():
            args[p] = int(args[p])
    elif kind == "string_variant":
        for p in keys:
            if isinstance(args[p], str):
                args[p] = args[p].upper().replace(" ", "  ") if rng.random() < 0.5 else args[p].lower() + "."
                break
    elif kind == "stringify" and keys:
        p = rng.choice(keys)
        args[p] = json.dumps(args[p]) if not isinstance(args[p], str) else args[p]
    elif kind == "reorder":
        rng.shuffle(calls)
    elif kind == "drop_call":
        calls.pop(k)
    elif kind == "dup_call":
        calls.append(copy.deepcopy(calls[k]))
    return calls


def to_trajectory(task, calls: list[tuple[str, dict]], *, raw: bool, tid: str) -> Trajectory:
    """A one-step trajectory answering `task` with `calls` (raw generated-text form or structured form)."""
    if raw and not calls:
        step = {"role": "assistant", "content": "I cannot do that with the given functions.", "token_ids": [0]}
    elif not calls:
        step = {"role": "assistant", "content": "I cannot do that with the given functions."}
    elif raw:
        text = "\n".join("<tool_call>\n" + json.dumps({"name": n, "arguments": a}) + "\n</tool_call>" for n, a in calls)
        step = {"role": "assistant", "content": text, "token_ids": [0]}
    else:
        step = {"role": "assistant", "content": None,
                "tool_calls": [{"id": f"call_{i}", "type": "function",
                                "function": {"name": n, "arguments": json.dumps(a, ensure_ascii=False)}}
                               for i, (n, a) in enumerate(calls)]}
    meta = {"task_id": task.id, "category": task.meta["category"], "ground_truth": task.ground_truth}
    return Trajectory(tid, task.messages + [step], task.tools, meta)
