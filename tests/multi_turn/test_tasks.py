"""Multi-turn BFCL tasks: loading, splits by scenario, categories left out."""
from __future__ import annotations

import pytest

from opsd.io.tasks import bfcl, load_tasks
from opsd.io.tasks import bfcl_multi_turn as mt


def test_every_variant_of_a_scenario_shares_its_split():
    splits = {}
    for cat in mt.CATEGORIES:
        for s in ("train", "validation", "heldout"):
            for t in load_tasks(f"bfcl:{cat}:{s}"):
                splits.setdefault(t.id.rsplit("_", 1)[1], set()).add(s)
    assert len(splits) == 200 and all(len(v) == 1 for v in splits.values())
    counts = {s: sum(1 for v in splits.values() if v == {s}) for s in ("train", "validation", "heldout")}
    assert 60 <= counts["heldout"] <= 100 and 60 <= counts["train"] <= 110 and counts["validation"] >= 15


def test_no_question_crosses_splits_or_single_turn_categories():
    by_split: dict[str, set] = {}
    for s in ("train", "validation", "heldout"):
        by_split[s] = {bfcl.normalise_question(bfcl.question_text(mt.entry(t.id)))
                       for t in load_tasks(f"bfcl:multi_turn_base:{s}")}
    assert not (by_split["train"] & by_split["heldout"]) and not (by_split["validation"] & by_split["heldout"])
    single = set(bfcl.split_index().question.values())
    assert not any(q in single for qs in by_split.values() for q in qs)


def test_task_shape_and_held_out_functions():
    t = load_tasks("bfcl:multi_turn_miss_func:all")[5]
    info = t.meta["multi_turn"]
    assert t.messages == info["turns"][0] and t.ground_truth is None
    added = info["added_tools"]["3"]
    names = {x["function"]["name"] for x in t.tools}
    assert [a["function"]["name"] for a in added] == ["post_tweet"] and "post_tweet" not in names
    assert "post_tweet" in info["turns"][3][0]["content"] and info["ground_truth"][2] == []
    assert all(x["function"]["parameters"]["type"] == "object" for x in t.tools)


def test_spec_routing_limit_and_mixing_with_single_turn():
    a = load_tasks("bfcl:multi_turn_base:heldout", limit=5)
    assert [t.id for t in a] == [t.id for t in load_tasks("bfcl:multi_turn_base:heldout", limit=5)]
    assert len(a) == 5 and all(mt.split_of(t.id) == "heldout" for t in a)
    mixed = load_tasks("bfcl:simple_python,multi_turn_base:train", limit=10)
    assert {t.meta["category"] for t in mixed} == {"simple_python", "multi_turn_base"}


@pytest.mark.parametrize("cat", ["web_search_base", "memory_kv", "multi_turn_composite"])
def test_left_out_categories_say_why(cat):
    with pytest.raises(ValueError, match="not supported: "):
        load_tasks(f"bfcl:{cat}:heldout")
