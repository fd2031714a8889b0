"""BFCL v4 conversion from the installed bfcl-eval data, leak-free splits and stratified limits."""
import json
import os
import subprocess
import sys

import jsonschema
import pytest

from opsd.io.tasks import bfcl, load_tasks
from tests.conftest import ROOT


def _types(schema, out):
    if isinstance(schema, dict):
        if "type" in schema:
            out.add(schema["type"] if isinstance(schema["type"], str) else tuple(schema["type"]))
        for k in ("properties",):
            for v in (schema.get(k) or {}).values():
                _types(v, out)
        if "items" in schema:
            _types(schema["items"], out)
    return out


@pytest.mark.parametrize("category", bfcl.CATEGORIES)
def test_every_category_converts_to_valid_json_schema(category):
    tasks = bfcl.load(category)
    assert tasks, category
    seen = set()
    meta = jsonschema.Draft202012Validator.META_SCHEMA
    for t in tasks:
        assert t.messages and t.messages[-1]["role"] == "user"
        assert t.ground_truth and all(len(call) == 1 for call in t.ground_truth)
        assert t.meta["category"] == category
        for tool in t.tools:
            params = tool["function"]["parameters"]
            jsonschema.Draft202012Validator.check_schema(params)  # meta-schema check
            jsonschema.validate(params, meta)
            assert params["type"] == "object"
            _types(params, seen)
    assert not seen & {"dict", "float", "tuple", "any"}, seen


def test_type_mapping_details():
    s = bfcl.to_json_schema({"type": "dict", "properties": {
        "a": {"type": "float"}, "b": {"type": "tuple", "items": {"type": "float"}}, "c": {"type": "any"},
        "d": {"type": "dict", "properties": {"e": {"type": "integer"}}}}, "required": ["a"], "optional": ["b"]})
    assert s == {"type": "object", "properties": {"a": {"type": "number"}, "b": {"type": "array", "items": {"type": "number"}},
                                                  "c": {}, "d": {"type": "object", "properties": {"e": {"type": "integer"}}}},
                 "required": ["a"]}
    # an int is accepted where BFCL says float
    jsonschema.validate({"a": 3}, s)


def test_ground_truth_and_known_item():
    t = next(x for x in bfcl.load("simple_python") if x.id == "simple_python_0")
    assert t.tools[0]["function"]["name"] == "calculate_triangle_area"
    assert t.ground_truth == [{"calculate_triangle_area": {"base": [10], "height": [5], "unit": ["units", ""]}}]


def _raw(category):
    """Items as shipped, read here with plain json (not through bfcl.load)."""
    path = bfcl.data_dir() / f"BFCL_v4_{category}.json"
    answers = {a["id"]: a["ground_truth"] for a in map(json.loads, (bfcl.data_dir() / "possible_answer" /
                                                                   f"BFCL_v4_{category}.json").open())}
    return {d["id"]: (d, answers[d["id"]]) for d in map(json.loads, path.open())}


def _norm(text):  # an independent normaliser: casefold, keep letters/digits only, single spaces
    return " ".join("".join(ch if ch.isalnum() else " " for ch in text.casefold()).split())


def _question(item):
    return "\n".join(m["content"] for turn in item["question"] for m in turn if m["role"] == "user")


@pytest.fixture(scope="module")
def splits():
    return {s: [t for c in bfcl.CATEGORIES for t in bfcl.load(c, s)] for s in ("train", "validation", "heldout")}


def test_splits_never_share_a_question_across_categories(splits):
    """On the real BFCL data: no held-out (or validation) task shares a normalised question, or a question plus
    function set, with any train task in any category; no question appears twice within a split either."""
    raw = {tid: v for c in bfcl.CATEGORIES for tid, v in _raw(c).items()}
    keys = {}
    for s, ts in splits.items():
        qs = [_norm(_question(raw[t.id][0])) for t in ts]
        qf = [(q, json.dumps(sorted(json.dumps(f, sort_keys=True) for f in raw[t.id][0]["function"])))
              for q, t in zip(qs, ts)]
        assert len(set(qs)) == len(qs), f"{s}: a question repeats within the split"
        keys[s] = (set(qs), set(qf))
    for a, b in (("train", "heldout"), ("train", "validation"), ("validation", "heldout")):
        assert not keys[a][0] & keys[b][0], f"{a} and {b} share questions"
        assert not keys[a][1] & keys[b][1], f"{a} and {b} share question + function set"
    # the leak the old id-hashed split had: a simple_python question copied verbatim into `multiple`
    by_q = {}
    for tid, (item, _) in raw.items():
        by_q.setdefault(_norm(_question(item)), []).append(tid)
    cross = [ids for ids in by_q.values() if len({i.rsplit("_", 1)[0] for i in ids}) > 1]
    assert len(cross) >= 90  # the data really has them
    for ids in cross:
        kept = [i for i in ids if bfcl.split_of(i) != "dropped"]
        assert len(kept) == 1, ids


def test_every_item_in_exactly_one_split_with_its_own_content(splits):
    """Each task keeps the content of its own BFCL item (messages, tools, ground truth), and the three splits
    plus the dropped duplicates are exactly the shipped items."""
    rep = bfcl.split_report()
    seen = {}
    for s, ts in splits.items():
        for t in ts:
            assert t.id not in seen, (t.id, s, seen[t.id])
            seen[t.id] = s
    for c in bfcl.CATEGORIES:
        raw = _raw(c)
        for t in (t for ts in splits.values() for t in ts if t.meta["category"] == c):
            item, answer = raw[t.id]
            assert [m["content"] for m in t.messages] == [m["content"] for m in item["question"][0]]
            assert [tool["function"]["name"] for tool in t.tools] == [f["name"] for f in item["function"]]
            assert t.ground_truth == answer
        dropped = [tid for tid in raw if tid not in seen]
        assert all(bfcl.split_of(tid) == "dropped" for tid in dropped)
        assert len(dropped) == rep["per_split"]["dropped"]["by_category"].get(c, 0)
    n_items = sum(len(_raw(c)) for c in bfcl.CATEGORIES)
    assert rep["items"] == n_items == len(seen) + rep["dropped"]
    assert rep["dropped"] == n_items - rep["questions"] > 100  # one task kept per question
    n = len(seen)
    assert 0.33 < len(splits["heldout"]) / n < 0.47 and 0.10 < len(splits["validation"]) / n < 0.20


def test_kept_duplicate_is_the_one_with_a_choice_of_tools():
    idx = bfcl.split_index()
    pairs = [(d, k) for d, k in idx.kept_instead.items() if d.startswith("simple_python_")]
    assert pairs
    for d, k in pairs:
        assert k.startswith("multiple_") and idx.question[d] == idx.question[k]


def test_split_is_the_same_in_another_process():
    """The split hashes text with sha256, not Python's per-process `hash()`."""
    ids = [t.id for t in load_tasks("bfcl:multiple,live_simple:heldout")][:50]
    code = ("import json,sys; from opsd.io.tasks import bfcl; "
            "print(json.dumps([bfcl.split_of(i) for i in json.load(sys.stdin)]))")
    for seed in ("1", "2"):
        r = subprocess.run([sys.executable, "-c", code], input=json.dumps(ids), capture_output=True, text=True,
                           env={**os.environ, "PYTHONHASHSEED": seed}, cwd=ROOT, check=True)
        assert json.loads(r.stdout) == ["heldout"] * len(ids)
    with pytest.raises(ValueError, match="not a task"):
        bfcl.split_of("multiple_99999")


def test_allocate_is_proportional_with_largest_remainder():
    assert bfcl.allocate([120, 90], 20) == [11, 9]  # quotas 11.43 / 8.57
    assert bfcl.allocate([1, 1, 1], 2) == [1, 1, 0]  # equal remainders: earlier strata first
    assert bfcl.allocate([5, 3], 100) == [5, 3]
    assert bfcl.allocate([300, 10], 31) == [30, 1]


def test_limit_takes_a_stratified_sample_not_the_first_n():
    spec = "bfcl:simple_python,multiple:heldout"
    every = load_tasks(spec)
    sizes = [sum(t.meta["category"] == c for t in every) for c in ("simple_python", "multiple")]
    ts = load_tasks(spec, limit=20)
    counts = [sum(t.meta["category"] == c for t in ts) for c in ("simple_python", "multiple")]
    assert counts == bfcl.allocate(sizes, 20) and min(counts) >= 8
    assert [t.id for t in ts] != [t.id for t in every[:20]]
    assert {t.id for t in ts} <= {t.id for t in every}
    assert [t.id for t in load_tasks(spec, limit=20)] == [t.id for t in ts]  # deterministic
    assert {t.id for t in load_tasks(spec, limit=10)} < {t.id for t in ts}  # a larger limit keeps what a smaller took
    # within a category the sample is spread over the file, not its head
    pos = {t.id: k for k, t in enumerate(every)}
    assert max(pos[t.id] for t in ts if t.meta["category"] == "simple_python") > sizes[0] // 2


def test_spec_parsing_and_limit():
    ts = load_tasks("bfcl:simple_python,multiple:validation", limit=5)
    assert len(ts) == 5 and all(bfcl.split_of(t.id) == "validation" for t in ts)
    with pytest.raises(ValueError, match="unknown BFCL category"):
        load_tasks("bfcl:nope")
    with pytest.raises(ValueError, match="unknown split"):
        load_tasks("bfcl:multiple:test")
    with pytest.raises(ValueError, match="listed twice"):
        load_tasks("bfcl:multiple,multiple:train")
    with pytest.raises(ValueError, match="limit must be >= 1"):
        load_tasks("bfcl:multiple:train", limit=0)


def test_user_task_file(tmp_path):
    from opsd.io.trajectories import TrajectoryError

    p = tmp_path / "t.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "hi"}], "ground_truth": [{"f": {"a": [1]}}]}\n'
                 '{"messages": [{"role": "user", "content": "x"}], "ground_truth": {"f": 1}}\n')
    with pytest.raises(TrajectoryError, match=r"t.jsonl:2: \$.ground_truth"):
        load_tasks(str(p))
