"""Per-reply outcomes, the tables built from them, and paired before/after comparisons.

    from opsd.eval.metrics import reply_outcome, per_task_outcomes, compare
    o = reply_outcome(traj, critique, outcome_fn)       # one reply: name, checker verdicts, errors, finish
    o["rows"]                                            # the one row of every table this reply lands in
    cmp = compare(per_task)                              # paired stats for every outcome, row and category

Every reply lands in exactly one row of each table in `TABLES` (a task whose reply is missing lands
in `no_reply`), so each table's rows sum to n. The error table (`errors`) is multi-label: a reply
counts under every category it has; its partition is `n_errors`.

The name a reply commits to is read from its raw text, truncated calls included: the first
`"name"` key of a `<tool_call>` object (or of its `"function"` object), whether the string was
closed or not. A name that was never closed counts as undeclared once it has left every declared
name (a looping or runaway name); while it is still a prefix of a declared name it names no tool.
So a model cannot lower its "names an undeclared tool" rate by breaking the call around the name.

It can lower it by naming nothing (prose, a copied placeholder, an empty reply). The rule for every
error-type outcome is therefore: a reply without the wanted behaviour counts against the model. The
outcome the targets use is "does not name a declared tool" (`names_no_declared_tool`: undeclared,
no name, or no reply); "names an undeclared tool" is kept as a diagnostic row and is only read next
to "names no tool" and "no parseable call" (`opsd.eval.targets.no_collapse`).

This module never imports `opsd_critic`: the schema/reference error lists come from the `outcome_fn`
the caller passes (`opsd.critique.outcomes.reply_outcomes` for the rule critics).
"""
from __future__ import annotations

from json.decoder import scanstring
from typing import Callable

from opsd.eval import stats
from opsd.eval.official import official_verdict
from opsd.types import Critique, Trajectory

OutcomeFn = Callable[[Trajectory], dict]  # -> {"errors": [{"category", "source", ...}], "reference": verdict}

NO_REPLY = "no_reply"
TABLES = {
    "name": ("gt_function", "other_declared", "declared_no_ground_truth", "undeclared", "no_name", NO_REPLY),
    "official": ("valid", "invalid", "n/a", NO_REPLY),
    "agreement": ("both_valid", "official_only", "reference_only", "both_invalid", "not_compared", NO_REPLY),
    "critic": None,  # "ok", one row per first-error category, "critique_failed", "no_reply"
    "finish": ("stop", "length", "other", NO_REPLY),
    "n_errors": ("0", "1", "2", "3+", "not_checked", NO_REPLY),
}
TABLE_TITLES = {
    "name": "function name the reply commits to",
    "official": "official BFCL AST checker",
    "agreement": "official checker vs reference critic",
    "critic": "critic verdict (first error)",
    "finish": "finish reason",
    "n_errors": "errors found in the reply (schema + reference, whole reply)",
}
DECLARED_ROWS = ("gt_function", "other_declared", "declared_no_ground_truth")
FINISH = {"stop": "stop", "eos": "stop", "tool_calls": "stop", "length": "length"}
HEADLINE = {  # key: (label, predicate on an outcome)
    "names_no_declared_tool": ("does not name a declared tool (undeclared, none, or no reply)",
                               lambda o: o["rows"]["name"] not in DECLARED_ROWS),
    "names_undeclared_tool": ("names an undeclared tool (diagnostic: naming none also lowers it)",
                              lambda o: o["rows"]["name"] == "undeclared"),
    "names_declared_tool": ("names a declared tool", lambda o: o["rows"]["name"] in DECLARED_ROWS),
    "names_no_tool": ("names no tool", lambda o: o["rows"]["name"] == "no_name"),
    "names_gt_function": ("names the ground-truth function", lambda o: o["rows"]["name"] == "gt_function"),
    "official_accuracy": ("accuracy (official BFCL checker)", lambda o: o["rows"]["official"] == "valid"),
    "reference_accuracy": ("accuracy (reference critic)", lambda o: o.get("reference") == "ok"),
    "critic_ok": ("critic says ok", lambda o: o["rows"]["critic"] == "ok"),
    "no_parseable_call": ("no parseable call", lambda o: bool(o.get("parse_error")) or not o["reply"]),
    "cut_off": ("cut off at the token limit", lambda o: o["rows"]["finish"] == "length"),
    "critique_failed": ("critique failed", lambda o: o["rows"]["critic"] == "critique_failed"),
}
PER_CATEGORY_KEYS = ("names_no_declared_tool", "names_undeclared_tool", "names_declared_tool", "names_no_tool", "names_gt_function",
                     "official_accuracy", "critic_ok", "no_parseable_call", "cut_off")


# ----------------------------------------------------------------------------- the name a reply commits to
def _skip_ws(s: str, i: int) -> int:
    while i < len(s) and s[i] in " \t\r\n":
        i += 1
    return i


def _read_string(s: str, i: int) -> tuple[str, int, bool]:
    """The JSON string opening at s[i] == '"': (value, end, closed). Unclosed: the raw rest of `s`."""
    try:
        value, end = scanstring(s, i + 1, True)
        return value, end, True
    except ValueError:
        j = i + 1
        while j < len(s):
            if s[j] == "\\":
                j += 2
                continue
            if s[j] == '"':
                return s[i + 1:j], j + 1, True  # a string scanstring rejects (control char): still closed
            j += 1
        return s[i + 1:], len(s), False


def _name_in_object(s: str, i: int) -> tuple[str, bool] | None:
    """Scan the object opening at s[i] == '{' for its "name" key (or the "name" inside its "function" key).

    Returns (name, closed) when that key holds a string (closed or cut off), else None.
    """
    stack: list[list] = []  # one [bracket, current key] per open object/array
    j, expect_key = i, False
    while j < len(s):
        c = s[j]
        if c == '"':
            text, end, closed = _read_string(s, j)
            if not closed:
                return None
            k = _skip_ws(s, end)
            if expect_key and k < len(s) and s[k] == ":":
                parent = stack[-2][1] if len(stack) >= 2 else None
                if text == "name" and (len(stack) == 1 or (len(stack) == 2 and parent == "function")):
                    v = _skip_ws(s, k + 1)
                    if v < len(s) and s[v] == '"':
                        name, _, name_closed = _read_string(s, v)
                        return name, name_closed
                    return None
                stack[-1][1], expect_key, j = text, False, k + 1
                continue
            j = end
            continue
        if c in "{[":
            stack.append([c, None])
            expect_key = c == "{"
        elif c in "}]":
            if stack:
                stack.pop()
            if not stack:
                return None
            expect_key = False
        elif c == ",":
            expect_key = bool(stack) and stack[-1][0] == "{"
        j += 1
    return None


def first_name(text: str) -> tuple[str | None, bool]:
    """The first function name `text` commits to and whether its string was closed ((None, False) if none).

    Looks inside each `<tool_call>` block in order (the rest of the text when a block never closes);
    a text without any block is scanned from its first `{`.
    """
    starts = []
    pos = text.find("<tool_call>")
    if pos < 0:
        brace = text.find("{")
        starts = [brace] if brace >= 0 else []
    while pos >= 0:
        brace = text.find("{", pos)
        nxt = text.find("<tool_call>", pos + 1)
        if brace >= 0 and (nxt < 0 or brace < nxt):
            starts.append(brace)
        pos = nxt
    for b in starts:
        end = text.find("</tool_call>", b)
        found = _name_in_object(text[:end] if end >= 0 else text, b)
        if found is not None:
            return found
    return None, False


def name_row(name: str | None, closed: bool, declared: set[str], gt_names: set[str] | None) -> str:
    """Row of the "name" table for a reply's first name (see the module docstring)."""
    if name is None:
        return "no_name"
    if not closed:
        if any(d.startswith(name) for d in declared):
            return "no_name"  # cut off inside what is still a declared name
        return "undeclared"
    if name not in declared:
        return "undeclared"
    if gt_names is None:
        return "declared_no_ground_truth"
    return "gt_function" if name in gt_names else "other_declared"


def declared_names(traj: Trajectory) -> set[str]:
    out = set()
    for t in traj.tools:
        fn = t.get("function", t) if isinstance(t, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            out.add(fn["name"])
    return out


def ground_truth_names(traj: Trajectory) -> set[str] | None:
    gt = traj.meta.get("ground_truth")
    if not isinstance(gt, list) or not gt:
        return None
    return {k for call in gt if isinstance(call, dict) for k in call}


# ----------------------------------------------------------------------------- one reply
def _critic_row(c: Critique | None) -> str:
    if c is None or c.verdict == "failed":
        return "critique_failed"
    return "ok" if c.verdict == "ok" else (c.category or "unknown")


def _agreement_row(official: str, reference: str | None) -> str:
    if official not in ("valid", "invalid") or reference not in ("ok", "error"):
        return "not_compared"
    o, r = official == "valid", reference == "ok"
    return {(True, True): "both_valid", (True, False): "official_only", (False, True): "reference_only",
            (False, False): "both_invalid"}[(o, r)]


def no_reply_outcome(trajectory_id: str) -> dict:
    """The outcome of a task whose reply is missing (the rollout failed): `no_reply` in every table."""
    return {"trajectory_id": trajectory_id, "reply": False, "finish_reason": None, "name": None,
            "name_closed": False, "parse_error": "no reply", "official": {"verdict": NO_REPLY, "error": None},
            "reference": None, "critique": None, "errors": None, "rows": {t: NO_REPLY for t in TABLES}}


def reply_outcome(traj: Trajectory, critique: Critique | None, outcome_fn: OutcomeFn | None = None) -> dict:
    """Everything measured on one reply (the trajectory's last message), JSON-serialisable."""
    msg = traj.messages[-1] if traj.messages else {}
    text = msg.get("content") or "" if msg.get("role") == "assistant" else ""
    name, closed = first_name(text)
    if name is None and msg.get("tool_calls") and "<tool_call>" not in text:  # native calls from a server
        name, closed = msg["tool_calls"][0]["function"].get("name"), True
    official = official_verdict(traj)
    extra, extra_error = None, None
    if outcome_fn is not None:
        try:
            extra = outcome_fn(traj)
        except Exception as e:  # counted as not_checked, never dropped
            extra_error = f"{type(e).__name__}: {e}"[:300]
    errors = extra.get("errors") if extra else None
    reference = extra.get("reference") if extra else None
    finish_raw = traj.meta.get("finish_reason")
    n_err = None if errors is None else len({e["category"] for e in errors})
    rows = {
        "name": name_row(name, closed, declared_names(traj), ground_truth_names(traj)),
        "official": official["verdict"],
        "agreement": _agreement_row(official["verdict"], reference),
        "critic": _critic_row(critique),
        "finish": FINISH.get(finish_raw, "other"),
        "n_errors": "not_checked" if n_err is None else (str(n_err) if n_err < 3 else "3+"),
    }
    crit = None if critique is None else {"verdict": critique.verdict, "category": critique.category,
                                          "quote": critique.quote, "error": critique.error}
    return {"trajectory_id": traj.id, "reply": True, "finish_reason": finish_raw, "name": name,
            "name_closed": closed, "parse_error": traj.meta.get("parse_error"), "official": official,
            "reference": reference, "critique": crit, "errors": errors, "outcome_error": extra_error, "rows": rows}


def per_task_outcomes(tasks, before: list[Trajectory], after: list[Trajectory], crit_before: list[Critique],
                      crit_after: list[Critique], outcome_fn: OutcomeFn | None = None) -> list[dict]:
    """One entry per task: its category, tools, and the before and after outcomes of its first sample."""
    def index(trajs, crits):
        by_c = {c.trajectory_id: c for c in crits}
        out = {}
        for t in trajs:
            out.setdefault(t.meta.get("task_id", t.id), (t, by_c.get(t.id)))
        return out

    ib, ia = index(before, crit_before), index(after, crit_after)
    rows = []
    for task in tasks:
        names = sorted(declared_names(Trajectory(task.id, [], task.tools)))
        entry = {"task_id": task.id, "category": task.meta.get("category", "tasks"), "n_tools": len(task.tools),
                 "tool_names": names, "ground_truth_names": sorted({k for c in task.ground_truth or [] for k in c}) or None}
        for side, idx in (("before", ib), ("after", ia)):
            traj, crit = idx.get(task.id, (None, None))
            entry[side] = no_reply_outcome(f"{task.id}#s0") if traj is None else reply_outcome(traj, crit, outcome_fn)
        rows.append(entry)
    return rows


# ----------------------------------------------------------------------------- tables and paired comparisons
def flags(outcome: dict) -> dict[str, bool]:
    """The headline binary outcomes of one reply."""
    return {k: bool(pred(outcome)) for k, (_, pred) in HEADLINE.items()}


def table_rows(table: str, outcomes: list[dict]) -> list[str]:
    """The rows of `table` in display order (fixed rows, then the critic's categories as they occur)."""
    if TABLES[table] is not None:
        return list(TABLES[table])
    cats = sorted({o["rows"]["critic"] for o in outcomes} - {"ok", "critique_failed", NO_REPLY})
    return ["ok", *cats, "critique_failed", NO_REPLY]


def error_categories(outcomes: list[dict]) -> list[str]:
    return sorted({e["category"] for o in outcomes for e in (o.get("errors") or [])})


def has_error(outcome: dict, category: str) -> bool:
    return any(e["category"] == category for e in outcome.get("errors") or [])


def compare(per_task: list[dict], *, n_boot: int = stats.N_BOOT, seed: int = stats.SEED) -> dict:
    """Paired before/after statistics on the same tasks: headline outcomes, every row of every table,
    every error category (multi-label), and the headline outcomes per task category."""
    b = [t["before"] for t in per_task]
    a = [t["after"] for t in per_task]
    kw = {"n_boot": n_boot, "seed": seed}

    def paired(pred, idx=None):
        sel = range(len(per_task)) if idx is None else idx
        return stats.paired_binary([pred(b[i]) for i in sel], [pred(a[i]) for i in sel], **kw)

    out = {"n": len(per_task),
           "outcomes": {k: paired(pred) | {"label": label} for k, (label, pred) in HEADLINE.items()},
           "tables": {}, "errors": {}, "per_category": {}}
    for table in TABLES:
        rows = table_rows(table, b + a)
        out["tables"][table] = {"title": TABLE_TITLES[table], "n": len(per_task),
                                "rows": {r: paired(lambda o, r=r: o["rows"][table] == r) for r in rows}}
    for cat in error_categories(b + a):
        out["errors"][cat] = paired(lambda o, cat=cat: has_error(o, cat))
    for cat in sorted({t["category"] for t in per_task}):
        idx = [i for i, t in enumerate(per_task) if t["category"] == cat]
        out["per_category"][cat] = {"n": len(idx), "n_tools_mean": sum(per_task[i]["n_tools"] for i in idx) / len(idx),
                                    "outcomes": {k: paired(HEADLINE[k][1], idx) for k in PER_CATEGORY_KEYS}}
    return out
