"""Keep training and validation off the held-out tasks: every pipeline Config refuses a spec that shares a question.

    from opsd.io.tasks.overlap import check_off_heldout
    check_off_heldout({"rollout.tasks": "bfcl:multiple", "validation_tasks": ""}, heldout="bfcl:multiple:heldout")
    # ValueError: rollout.tasks: 424 of the 400 tasks of 'bfcl:multiple' ask a question of the held-out tasks ...

Overlap is decided by QUESTION TEXT, not by task id. BFCL repeats questions across categories under other ids
(`simple_python_4` is `multiple_96` with fewer tools), so an id check passes `bfcl:simple_python` next to
`bfcl:multiple:heldout` although 50 of that held-out split's questions are in it. A task's question is the
normalised text of its user turns (`bfcl.normalise_question`, the key BFCL's splits are made from: case,
punctuation and whitespace runs do not count); a BFCL multi-turn task's is its scenario's base question (the
variants of one scenario share it). Ids are not compared: a BFCL id always asks the same question, and the ids
of two task files say nothing about each other.

The held-out tasks are the pipeline's own (`--eval.tasks`, `--heldout-tasks`) plus BFCL's held-out split of every
category, single- and multi-turn (`opsd loop` scores no held-out split itself, but the demo, compare and
`opsd eval` do). The splits are disjoint by construction (every question lands in one split), so the check
refuses what can leak: a spec without a split (`bfcl:multiple` = `all`), a held-out spec used for training,
and a task file that holds held-out questions. A spec that does not load (a task file that does not exist yet,
an unknown category) is left to its stage, which reports it.
"""
from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

from opsd.io.tasks import Task, load_tasks
from opsd.io.tasks import bfcl
from opsd.io.tasks import bfcl_multi_turn as mt

BFCL_HELDOUT = (f"bfcl:{','.join(bfcl.CATEGORIES)}:heldout", f"bfcl:{','.join(mt.CATEGORIES)}:heldout")
SHOWN = 5  # overlapping pairs named in the error


def question_key(task: Task) -> str:
    """The normalised question a task asks (see the module docstring)."""
    info = task.meta.get("multi_turn") if isinstance(task.meta, dict) else None
    if isinstance(info, dict) and mt.is_category(str(info.get("bfcl_id", "")).rsplit("_", 1)[0]):
        return mt.scenario_question(int(info["bfcl_id"].rsplit("_", 1)[1]))
    return bfcl.normalise_question("\n".join(str(m.get("content") or "") for m in task.messages
                                             if m.get("role") == "user"))


@lru_cache(maxsize=64)
def _questions_cached(spec: str, stamp: tuple) -> tuple[tuple[str, str, str], ...]:
    return tuple((t.id, question_key(t), spec) for t in load_tasks(spec))


def questions(spec: str) -> tuple[tuple[str, str, str], ...] | None:
    """(task id, question, spec) of every task of `spec` (all of it, not a sample); None for a spec that does not
    load (a task file that does not exist yet, an unknown category, BFCL data not installed: its stage says so)."""
    if spec.startswith("bfcl:"):
        if importlib.util.find_spec("bfcl_eval") is None:
            return None
        try:
            return _questions_cached(spec, ())
        except ValueError:
            return None
    p = Path(spec)
    if not p.is_file():
        return None
    st = p.stat()
    return _questions_cached(str(p.resolve()), (st.st_mtime_ns, st.st_size))


def heldout_overlap(tasks, heldout) -> list[tuple[str, str]]:
    """(task id, held-out task id) for every task of `tasks` that asks a question of `heldout`; both are
    sequences of (id, question, ...) rows, as `questions` returns."""
    by_question: dict[str, str] = {}
    for tid, q, *_ in heldout:
        by_question.setdefault(q, tid)  # the first held-out task that asks it (the pipeline's own spec comes first)
    return [(tid, by_question[q]) for tid, q, *_ in tasks if q in by_question]


def check_off_heldout(specs: dict[str, str], heldout: str | None = None) -> None:
    """Raise ValueError when a training or validation spec (`{field name: spec}`; "" = none) shares a question with
    the held-out tasks: `heldout` (a spec) and BFCL's held-out split of every category."""
    held_specs = [s for s in (heldout, *BFCL_HELDOUT) if s]
    held = [row for s in dict.fromkeys(held_specs) for row in (questions(s) or ())]
    if not held:
        return
    for name, spec in specs.items():
        rows = questions(spec) if spec else None
        if not rows:
            continue
        pairs = heldout_overlap(rows, held)
        if pairs:
            shown = ", ".join(f"{a} = {b}" for a, b in pairs[:SHOWN]) + (", ..." if len(pairs) > SHOWN else "")
            where = f"{heldout!r} and BFCL's held-out split" if heldout else "BFCL's held-out split"
            raise ValueError(
                f"{name}: {len(pairs)} of the {len(rows)} tasks of {spec!r} ask a question of the held-out tasks "
                f"({where}; task = held-out task: {shown}). Train and validate on the :train and :validation "
                "splits; a spec without a split loads all of them, held-out included")
