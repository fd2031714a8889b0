"""BFCL v4 conversion from the installed bfcl-eval data."""
import jsonschema
import pytest

from opsd.io.tasks import bfcl, load_tasks


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


def test_split_is_deterministic_disjoint_and_complete():
    tr, ho, al = (bfcl.load("multiple", s) for s in ("train", "heldout", "all"))
    ids_tr, ids_ho = {t.id for t in tr}, {t.id for t in ho}
    assert not ids_tr & ids_ho and ids_tr | ids_ho == {t.id for t in al}
    assert 0.35 < len(ho) / len(al) < 0.65
    assert [t.id for t in bfcl.load("multiple", "train")] == [t.id for t in tr]
    assert bfcl.split_of("multiple_0") == bfcl.split_of("multiple_0")


def test_spec_parsing_and_limit():
    ts = load_tasks("bfcl:simple_python,multiple:heldout", limit=5)
    assert len(ts) == 5 and all(bfcl.split_of(t.id) == "heldout" for t in ts)
    with pytest.raises(ValueError, match="unknown BFCL category"):
        load_tasks("bfcl:nope")
    with pytest.raises(ValueError, match="unknown split"):
        load_tasks("bfcl:multiple:test")


def test_user_task_file(tmp_path):
    from opsd.io.trajectories import TrajectoryError

    p = tmp_path / "t.jsonl"
    p.write_text('{"messages": [{"role": "user", "content": "hi"}], "ground_truth": [{"f": {"a": [1]}}]}\n'
                 '{"messages": [{"role": "user", "content": "x"}], "ground_truth": {"f": 1}}\n')
    with pytest.raises(TrajectoryError, match=r"t.jsonl:2: \$.ground_truth"):
        load_tasks(str(p))
