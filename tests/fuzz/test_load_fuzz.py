"""Fuzzing `load_trajectories` with random bytes, random JSON and random nesting (hypothesis).

Whatever the input, loading either gives trajectories or rejects that name the file and a line in
it; no other exception escapes, and every valid line of a file is always kept, unchanged.
"""
import bz2
import gzip
import json
import os
import string

import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opsd.io.sources import MAX_DEPTH
from opsd.io.trajectories import LoadSummary, TrajectoryError, load_trajectories

# a small budget keeps the suite under a minute; OPSD_FUZZ_EXAMPLES=5000 hunts longer
FUZZ = settings(max_examples=int(os.environ.get("OPSD_FUZZ_EXAMPLES", "100")), deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                       HealthCheck.too_slow])
TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=40)  # any Unicode but lone surrogates
JSON = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | TEXT,
                    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(TEXT, inner, max_size=4), max_leaves=20)
COMPRESS = {"plain": lambda b: b, "gzip": gzip.compress, "zstd": lambda b: zstandard.ZstdCompressor().compress(b),
            "bz2": bz2.compress}


@st.composite
def valid_trajectory(draw, n):
    """A valid record in the openai or messages format; `n` makes ids unique among the valid ones."""
    msgs = [{"role": "user", "content": draw(TEXT)}]
    if draw(st.booleans()):
        msgs.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": draw(st.text(string.ascii_letters, min_size=1, max_size=8)),
                                                          "arguments": json.dumps(draw(JSON))}}]})
        msgs.append({"role": "tool", "tool_call_id": "c1", "content": draw(TEXT)})
    msgs.append({"role": "assistant", "content": draw(TEXT)})
    kind = draw(st.sampled_from(["given id", "no id", "bare list"]))
    if kind == "bare list":
        return msgs
    rec = {"messages": msgs, "meta": {"x": draw(JSON)}}
    if kind == "given id":
        rec["id"] = f"valid-{n}"
    return rec


def nested(depth: int, kinds: str) -> str:
    """JSON nested `depth` levels deep: lists ("l"), objects ("d"), or both in turn."""
    opens = "".join("[" if kinds[i % len(kinds)] == "l" else '{"k": ' for i in range(depth))
    closes = "".join("]" if kinds[i % len(kinds)] == "l" else "}" for i in reversed(range(depth)))
    return opens + "0" + closes


GARBAGE = st.one_of(
    st.binary(max_size=60).map(lambda b: b.replace(b"\n", b"")),  # random bytes, often not UTF-8
    JSON.map(lambda v: json.dumps(v).encode()),  # random JSON: mostly no known shape
    st.tuples(st.integers(1, 3000), st.sampled_from(["l", "d", "ld"])).map(  # random nesting, alone or in meta
        lambda t: ('{"id": "deep", "messages": [{"role": "user", "content": "x"}], "meta": ' + nested(*t) + "}").encode()),
    st.tuples(TEXT, st.integers(0, 80)).map(  # a valid line cut short
        lambda t: json.dumps({"messages": [{"role": "user", "content": t[0]}]}).encode()[:t[1]]),
)


def _check_rejects(rows, path, n_lines):
    for r in rows:
        assert r["file"] == str(path) and 1 <= r["line"] <= max(n_lines, 1) and r["error"], r


def _load(path, tmp_path):
    s = LoadSummary()
    with open(tmp_path / "rejects.jsonl", "w", encoding="utf-8") as rej:
        trajs = load_trajectories(path, rejects=rej, summary=s)
    rows = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text("utf-8").split("\n") if x]
    assert s.rejected == len(rows) and s.valid == len(trajs)
    return trajs, rows


@FUZZ
@given(data=st.data(), n_lines=st.integers(1, 12), compress=st.sampled_from(sorted(COMPRESS)))
def test_jsonl_with_garbage_lines_keeps_every_valid_line(tmp_path, data, n_lines, compress):
    lines, valid = [], {}  # line number -> expected record
    for k in range(n_lines):
        if k == 0 or data.draw(st.booleans()):
            rec = data.draw(valid_trajectory(k))
            lines.append(json.dumps(rec, ensure_ascii=data.draw(st.booleans())).encode())
            valid[k + 1] = rec
        else:
            lines.append(data.draw(GARBAGE))
    path = tmp_path / "fuzz.jsonl"
    path.write_bytes(COMPRESS[compress](b"\n".join(lines) + b"\n"))
    trajs, rows = _load(path, tmp_path)
    by_id = {t.id: t for t in trajs}
    for line, rec in valid.items():
        tid = rec.get("id", f"fuzz.jsonl:{line}") if isinstance(rec, dict) else f"fuzz.jsonl:{line}"
        assert tid in by_id, (line, rows)
        assert by_id[tid].messages == (rec["messages"] if isinstance(rec, dict) else rec)
    _check_rejects(rows, path, n_lines)
    non_blank = sum(1 for x in lines if x.strip() and x.strip() != b"\xef\xbb\xbf")
    assert len(trajs) + len(rows) >= non_blank  # every line loads or is rejected


@FUZZ
@given(blob=st.binary(max_size=400), prefix=st.sampled_from([b"", b"\x1f\x8b", b"\x28\xb5\x2f\xfd", b"\xef\xbb\xbf",
                                                               b"\xff\xfe", b"[", b"{\n"]))
def test_random_bytes_load_or_reject_naming_file_and_line(tmp_path, blob, prefix):
    path = tmp_path / "random.jsonl"
    path.write_bytes(prefix + blob)
    _, rows = _load(path, tmp_path)
    _check_rejects(rows, path, (prefix + blob).count(b"\n") + 1)
    try:  # without a rejects file: a TrajectoryError or nothing, never anything else
        load_trajectories(path)
    except TrajectoryError as e:
        assert e.file == str(path) and e.line >= 1


@FUZZ
@given(value=JSON, indent=st.sampled_from([None, 2, 4]))
def test_random_json_documents_load_or_reject(tmp_path, value, indent):
    path = tmp_path / "doc.json"
    text = json.dumps(value, indent=indent)
    path.write_text(text)
    _, rows = _load(path, tmp_path)
    _check_rejects(rows, path, text.count("\n") + 1)


@FUZZ
@given(data=st.data(), n=st.integers(1, 6))
def test_pretty_printed_array_keeps_valid_elements_among_random_ones(tmp_path, data, n):
    items, valid = [], {}
    for k in range(n):
        if data.draw(st.booleans()):
            rec = data.draw(valid_trajectory(k))
            if isinstance(rec, list):  # a bare message list inside an array would make it one trajectory
                rec = {"messages": rec}
            valid[k] = rec
            items.append(rec)
        else:
            items.append(data.draw(JSON.filter(lambda v: not isinstance(v, list))))
    if not valid:
        valid[n] = {"id": "anchor", "messages": [{"role": "user", "content": "x"}]}
        items.append(valid[n])
    path = tmp_path / "array.json"
    text = json.dumps(items, indent=2)
    path.write_text(text)
    trajs, rows = _load(path, tmp_path)
    by_id = {t.id: t for t in trajs}
    for k, rec in valid.items():
        assert by_id[rec.get("id", f"array.json[{k}]")].messages == rec["messages"]
    _check_rejects(rows, path, text.count("\n") + 1)
    assert all(r["path"].startswith("$[") for r in rows)


@FUZZ
@given(depth=st.integers(1, 5000), kinds=st.sampled_from(["l", "d", "ld", "dl"]), where=st.sampled_from(["meta", "line"]))
def test_random_nesting_loads_up_to_the_limit_and_is_rejected_beyond(tmp_path, depth, kinds, where):
    good = json.dumps({"id": "good", "messages": [{"role": "user", "content": "ok"}]})
    if where == "meta":
        line = '{"id": "deep", "messages": [{"role": "user", "content": "x"}], "meta": {"n": ' + nested(depth, kinds) + "}}"
        total = depth + 2  # the record and meta objects around it
    else:
        line, total = nested(depth, kinds), depth
    path = tmp_path / "deep.jsonl"
    path.write_text(good + "\n" + line + "\n" + good.replace('"good"', '"good2"') + "\n")
    trajs, rows = _load(path, tmp_path)
    assert {"good", "good2"} <= {t.id for t in trajs}
    if total > MAX_DEPTH:
        assert [r["line"] for r in rows] == [2] and "nested at most" in rows[0]["error"]
    elif where == "meta":
        assert "deep" in {t.id for t in trajs} and not rows


def _paths(node, path=()):
    yield path
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _paths(v, path + (k,))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _paths(v, path + (i,))


SAMPLE_RECORDS = None


def _samples():
    global SAMPLE_RECORDS
    if SAMPLE_RECORDS is None:
        from tests.conftest import DATA

        SAMPLE_RECORDS = [t.to_dict() for t in load_trajectories([DATA / "sample_openai.jsonl", DATA / "sample_otel.jsonl",
                                                                  DATA / "sample_xlam.json"])]
        SAMPLE_RECORDS[0]["messages"][2]["token_ids"] = [1, 2, 3]
        SAMPLE_RECORDS[0]["messages"][2]["prefill"] = ""
    return SAMPLE_RECORDS


MUTANT = st.one_of(JSON, st.sampled_from([True, False, 1.0, -1, "", [], {}, None, "function", "assistant", "tool"]))


@settings(FUZZ, max_examples=FUZZ.max_examples * 10)  # cheap (about 2 ms each): look harder
@given(data=st.data())
def test_fast_path_never_accepts_what_the_schema_rejects(data):
    from opsd.io.trajectories import _validator, fast_valid

    base = json.loads(json.dumps(data.draw(st.sampled_from(_samples()))))
    assert fast_valid(base)  # the fast path does serve real records
    for _ in range(data.draw(st.integers(1, 3))):
        paths = [p for p in _paths(base) if p]
        path = data.draw(st.sampled_from(paths))
        parent = base
        for key in path[:-1]:
            parent = parent[key]
        if data.draw(st.booleans()) and isinstance(parent, dict):
            parent.pop(path[-1])
        else:
            parent[path[-1]] = data.draw(MUTANT)
    if fast_valid(base):
        assert _validator("trajectory").is_valid(base), base
