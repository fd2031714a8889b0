import json

import pytest

from opsd.io.trajectories import (
    LoadSummary,
    TrajectoryError,
    iter_trajectories,
    load_trajectories,
    normalise,
    parse_tool_call_text,
)
from tests.conftest import DATA, SAMPLE_LOGS


def test_sample_files_load_in_every_format():
    s = LoadSummary()
    trajs = load_trajectories([DATA / f for f in SAMPLE_LOGS], summary=s)
    assert s.per_format["openai"] >= 8 and s.per_format["messages"] >= 2 and s.per_format["sharegpt"] >= 3
    assert s.rejected == 0 and len(trajs) == s.valid
    assert len({t.id for t in trajs}) == len(trajs)


def test_sharegpt_normalised_to_openai_calls_and_tools():
    trajs = {t.id: t for t in load_trajectories(DATA / "sample_sharegpt.jsonl")}
    t = trajs["sg-weather-ok"]
    # tools came from the system prompt's <tools> block
    assert [x["function"]["name"] for x in t.tools] == ["get_weather", "search_flights"]
    a = t.messages[2]
    assert a["role"] == "assistant" and a["content"] == ""
    assert a["tool_calls"][0]["function"]["name"] == "get_weather"
    assert json.loads(a["tool_calls"][0]["function"]["arguments"]) == {"city": "Rome"}
    tool = t.messages[3]
    assert tool["role"] == "tool" and tool["tool_call_id"] == a["tool_calls"][0]["id"] and tool["content"] == '{"temp": 24}'
    # tools given as a JSON string are accepted too
    assert [x["function"]["name"] for x in trajs["sg-unknown-tool"].tools] == ["get_weather", "search_flights"]


def test_bare_message_list_gets_stable_id():
    line = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    t1, fmt = normalise(line)
    t2, _ = normalise(json.loads(json.dumps(line)))
    assert fmt == "messages" and t1.id == t2.id and t1.id.startswith("traj-")


def test_unparsable_hermes_call_is_kept_not_dropped():
    content, calls, errors = parse_tool_call_text('ok <tool_call>{"name": "f", "arguments": {"a": 1}}</tool_call> '
                                                  '<tool_call>{"name": broken</tool_call>')
    assert len(calls) == 1 and calls[0]["function"]["name"] == "f"
    assert errors and '<tool_call>{"name": broken</tool_call>' in content


BAD = [
    ('{"id": "x", "messages": [{"role": "user", "content": "hi"}', "$", "valid JSON"),
    ('{"id": "x"}', "$", "an object with 'messages' (openai), a JSON list of chat messages, an object with 'conversations'"),
    ('{"id": "x", "messages": []}', "$.messages", "should be non-empty"),
    ('{"id": "x", "messages": [{"role": "robot", "content": "hi"}]}', "$.messages[0].role", "is not one of"),
    ('{"id": "x", "messages": [{"role": "user"}]}', "$.messages[0]", "'content' is a required property"),
    ('{"id": "x", "messages": [{"role": "assistant", "tool_calls": [{"function": {"name": "f", "arguments": {"a": 1}}}]}]}',
     "$.messages[0].tool_calls[0].function.arguments", "is not of type 'string'"),
    ('{"id": "x", "messages": [{"role": "assistant", "tool_calls": [{"function": {"arguments": "{}"}}]}]}',
     "$.messages[0].tool_calls[0].function", "'name' is a required property"),
    ('{"id": "x", "messages": [{"role": "tool", "content": "42"}]}', "$.messages[0]", "'tool_call_id' is a required property"),
    ('{"id": "x", "messages": [{"role": "assistant"}]}', "$.messages[0]", "needs a string 'content' or a non-empty 'tool_calls'"),
    ('{"id": "x", "messages": [{"role": "user", "content": "q"}], "tools": [{"type": "function", "function": {}}]}',
     "$.tools[0].function", "'name' is a required property"),
    ('{"id": "x", "messages": [{"role": "assistant", "content": null, "tool_calls": [{"id": "a", "function": {"name": "f", "arguments": "{}"}}]},'
     ' {"role": "tool", "tool_call_id": "zzz", "content": "1"}]}', "$.messages[1].tool_call_id", "does not match"),
    ('[{"role": "user", "content": 5}]', "$[0].content", "is not of type 'string'"),
    ('{"conversations": [{"from": "alien", "value": "hi"}]}', "$.conversations[0].from", "is not one of"),
    ('{"conversations": [{"from": "system", "value": "<tools>[{broken</tools>"}]}', "$.conversations[0].value", "not JSON"),
]


@pytest.mark.parametrize("line,path,expected", BAD)
def test_each_class_of_bad_input_names_file_line_path_and_expectation(tmp_path, line, path, expected):
    f = tmp_path / "logs.jsonl"
    f.write_text('{"id": "good", "messages": [{"role": "user", "content": "ok"}]}\n\n' + line + "\n")
    with pytest.raises(TrajectoryError) as ei:
        list(iter_trajectories(f))
    e = ei.value
    assert (e.file, e.line, e.path) == (str(f), 3, path)
    assert expected in e.expected
    assert str(e).startswith(f"{f}:3: {path}: ")


def test_duplicate_ids_rejected(tmp_path):
    f = tmp_path / "d.jsonl"
    row = '{"id": "same", "messages": [{"role": "user", "content": "ok"}]}\n'
    f.write_text(row + row)
    with pytest.raises(TrajectoryError, match=r"d.jsonl:2: \$.id: a unique id"):
        list(iter_trajectories(f))


def test_rejects_file_collects_and_continues(tmp_path):
    f = tmp_path / "mixed.jsonl"
    good = '{"id": "g%d", "messages": [{"role": "user", "content": "ok"}]}'
    f.write_text("\n".join([good % 1, BAD[0][0], good % 2, BAD[3][0], good % 3]) + "\n")
    s = LoadSummary()
    with open(tmp_path / "rej.jsonl", "w") as rej:
        ids = [t.id for t in iter_trajectories(f, rejects=rej, summary=s)]
    assert ids == ["g1", "g2", "g3"] and s.rejected == 2 and s.valid == 3
    rows = [json.loads(x) for x in (tmp_path / "rej.jsonl").read_text().splitlines()]
    assert [r["line"] for r in rows] == [2, 4]
    assert rows[1]["path"] == "$.messages[0].role" and rows[1]["raw"] == BAD[3][0]


# -- issue 11: bad bytes and shapes never crash a run, and nothing valid is lost ----------------------

GOOD = '{"id": "g%d", "messages": [{"role": "user", "content": "ok %d"}]}'


def _load_with_rejects(paths, tmp_path):
    s = LoadSummary()
    with open(tmp_path / "rejects.jsonl", "w", encoding="utf-8") as rej:
        trajs = load_trajectories(paths, rejects=rej, summary=s)
    rows = [json.loads(x) for x in (tmp_path / "rejects.jsonl").read_text("utf-8").splitlines()]
    return trajs, s, rows


def test_non_utf8_byte_is_a_reject_naming_file_and_line_and_the_rest_loads(tmp_path):
    f = tmp_path / "latin1.jsonl"
    f.write_bytes(b"\n".join([(GOOD % (1, 1)).encode(), b'{"id": "bad", "messages": [{"role": "user", "content": "caf\xe9"}]}',
                              (GOOD % (3, 3)).encode()]) + b"\n")
    trajs, s, rows = _load_with_rejects(f, tmp_path)
    assert [t.id for t in trajs] == ["g1", "g3"] and s.rejected == 1
    assert rows[0]["file"] == str(f) and rows[0]["line"] == 2 and "UTF-8" in rows[0]["error"]
    assert "0xe9" in rows[0]["error"] and "\\xe9" in rows[0]["raw"]
    with pytest.raises(TrajectoryError, match=r"latin1.jsonl:2: \$: UTF-8 text"):
        load_trajectories(f)  # without --rejects: a clear error, not a UnicodeDecodeError


@pytest.mark.parametrize("suffix,compress", [
    (".jsonl.gz", lambda b: __import__("gzip").compress(b)),
    (".jsonl.zst", lambda b: __import__("zstandard").ZstdCompressor().compress(b)),
    (".jsonl.bz2", lambda b: __import__("bz2").compress(b)),
    (".jsonl.xz", lambda b: __import__("lzma").compress(b)),
    (".jsonl", lambda b: __import__("gzip").compress(b)),  # recognised by its bytes, not its name
])
def test_compressed_logs_read_transparently(tmp_path, suffix, compress):
    f = tmp_path / f"logs{suffix}"
    f.write_bytes(compress(("\n".join(GOOD % (i, i) for i in range(5)) + "\n").encode()))
    assert [t.id for t in load_trajectories(f)] == [f"g{i}" for i in range(5)]


def test_truncated_compressed_log_keeps_what_was_read_and_names_the_line(tmp_path):
    import gzip

    f = tmp_path / "cut.jsonl.gz"
    blob = gzip.compress(("\n".join(GOOD % (i, i) for i in range(2000)) + "\n").encode())
    f.write_bytes(blob[:len(blob) // 2])
    trajs, s, rows = _load_with_rejects(f, tmp_path)
    assert len(trajs) > 100 and [t.id for t in trajs] == [f"g{i}" for i in range(len(trajs))]
    assert s.rejected == 1 and rows[0]["line"] == len(trajs) + 1 and "truncated" in rows[0]["error"]


@pytest.mark.parametrize("depth", [3000, 150])
def test_deep_nesting_is_a_reject_with_a_reason(tmp_path, depth):
    f = tmp_path / "deep.jsonl"
    deep = '{"id": "deep", "messages": [{"role": "user", "content": "x"}], "meta": {"a": ' + "[" * depth + "]" * depth + "}}"
    f.write_text("\n".join([GOOD % (1, 1), deep, GOOD % (2, 2)]) + "\n")
    trajs, s, rows = _load_with_rejects(f, tmp_path)
    assert [t.id for t in trajs] == ["g1", "g2"]
    assert rows[0]["line"] == 2 and "nested at most 100 levels" in rows[0]["error"]


def test_utf8_bom_on_line_one_is_accepted(tmp_path):
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + ("\n".join(GOOD % (i, i) for i in range(2)) + "\n").encode())
    assert [t.id for t in load_trajectories(f)] == ["g0", "g1"]


def test_utf16_file_is_one_clear_reject(tmp_path):
    f = tmp_path / "u16.jsonl"
    f.write_bytes(("\n".join(GOOD % (i, i) for i in range(2)) + "\n").encode("utf-16"))
    with pytest.raises(TrajectoryError, match="this file is UTF-16"):
        load_trajectories(f)


def _pretty(objs, indent=2):
    return json.dumps(objs, indent=indent, ensure_ascii=False)


def test_json_array_and_pretty_printed_documents_are_detected(tmp_path):
    trajs = [json.loads(GOOD % (i, i)) for i in range(3)]
    one_line = tmp_path / "array.json"
    one_line.write_text(json.dumps(trajs))
    pretty = tmp_path / "pretty.json"
    pretty.write_text(_pretty(trajs) + "\n")
    single = tmp_path / "single.json"
    single.write_text(_pretty(trajs[0]))
    stream = tmp_path / "stream.json"  # `jq .` output: several pretty objects one after another
    stream.write_text("\n".join(_pretty(t) for t in trajs) + "\n")
    messages = tmp_path / "conversation.json"  # a pretty-printed bare list of chat messages is ONE trajectory
    messages.write_text(_pretty(trajs[0]["messages"] + [{"role": "assistant", "content": "hi"}]))
    assert [t.id for t in load_trajectories(one_line)] == ["g0", "g1", "g2"]
    assert [t.id for t in load_trajectories(pretty)] == ["g0", "g1", "g2"]
    assert [t.id for t in load_trajectories(single)] == ["g0"]
    assert [t.id for t in load_trajectories(stream)] == ["g0", "g1", "g2"]
    (conv,) = load_trajectories(messages)
    assert len(conv.messages) == 2 and conv.id == "conversation.json:1"


def test_errors_in_a_json_document_name_the_element_and_its_line(tmp_path):
    rows = [json.loads(GOOD % (i, i)) for i in range(3)]
    rows[1]["messages"][0]["role"] = "robot"
    f = tmp_path / "pretty.json"
    f.write_text(_pretty(rows))
    line_of_element_1 = f.read_text().splitlines().index("  {", 2) + 1
    with pytest.raises(TrajectoryError) as ei:
        load_trajectories(f)
    assert (ei.value.line, ei.value.path) == (line_of_element_1, "$[1].messages[0].role")
    trajs, s, rej = _load_with_rejects(f, tmp_path)
    assert [t.id for t in trajs] == ["g0", "g2"] and rej[0]["path"] == "$[1].messages[0].role"


def test_broken_element_in_a_pretty_array_is_skipped_and_the_rest_kept(tmp_path):
    text = _pretty([json.loads(GOOD % (i, i)) for i in range(3)])
    lines = text.splitlines()
    k = next(i for i, x in enumerate(lines) if '"id": "g1"' in x)
    lines[k] = '    "id": "g1",,'  # a JSON syntax error inside element 1
    f = tmp_path / "broken.json"
    f.write_text("\n".join(lines))
    trajs, s, rows = _load_with_rejects(f, tmp_path)
    assert [t.id for t in trajs] == ["g0", "g2"] and s.rejected == 1
    assert rows[0]["line"] == k + 1 and "valid JSON" in rows[0]["error"] and rows[0]["path"] == "$[1]"


def test_jsonl_with_broken_first_line_is_still_read_as_lines(tmp_path):
    f = tmp_path / "logs.jsonl"
    f.write_text("\n".join(['{"id": "cut", "messages": [', GOOD % (1, 1), GOOD % (2, 2)]) + "\n")
    trajs, s, rows = _load_with_rejects(f, tmp_path)
    assert [t.id for t in trajs] == ["g1", "g2"] and rows[0]["line"] == 1


def test_json_error_message_has_no_doubled_at(tmp_path):
    f = tmp_path / "x.jsonl"
    f.write_text('{"id": "x", "messages": "unterminated\n')
    with pytest.raises(TrajectoryError) as ei:
        load_trajectories(f)
    assert "at at" not in str(ei.value) and "starting at column" in str(ei.value)


def test_identical_lines_without_id_are_all_kept_with_ids_from_file_and_line(tmp_path):
    f = tmp_path / "dups.jsonl"
    row = '{"messages": [{"role": "user", "content": "same"}, {"role": "assistant", "content": "same"}]}'
    f.write_text("\n".join([row, row, row]) + "\n")
    trajs = load_trajectories(f)
    assert [t.id for t in trajs] == ["dups.jsonl:1", "dups.jsonl:2", "dups.jsonl:3"]
    bare = tmp_path / "bare.jsonl"
    bare.write_text('[{"role": "user", "content": "hi"}]\n' * 2)
    assert [t.id for t in load_trajectories(bare)] == ["bare.jsonl:1", "bare.jsonl:2"]


def test_made_ids_never_collide_across_files_with_the_same_name(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    for d in "ab":
        (tmp_path / d / "logs.jsonl").write_text('[{"role": "user", "content": "hi"}]\n')
    trajs = load_trajectories([tmp_path / "a" / "logs.jsonl", tmp_path / "b" / "logs.jsonl"])
    assert len(trajs) == 2 and len({t.id for t in trajs}) == 2


def test_collision_of_user_ids_names_both_places(tmp_path):
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text(GOOD % (1, 1) + "\n")
    b.write_text(GOOD % (2, 2) + "\n" + GOOD % (1, 9) + "\n")
    with pytest.raises(TrajectoryError) as ei:
        load_trajectories([a, b])
    e = ei.value
    assert (e.file, e.line, e.path) == (str(b), 2, "$.id") and f"{a}:1" in e.expected


HERMES_PARALLEL = {"id": "par", "conversations": [
    {"from": "human", "value": "Weather in Rome and Oslo?"},
    {"from": "gpt", "value": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n'
                             '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>'},
    {"from": "tool", "value": '<tool_response>\n{"name": "get_weather", "content": {"temp": 24}}\n</tool_response>\n'
                              '<tool_response>\n{"name": "get_weather", "content": {"temp": 3}}\n</tool_response>'},
    {"from": "gpt", "value": "Rome 24, Oslo 3."}]}


def test_hermes_parallel_results_in_one_tool_turn_are_split_and_matched_in_order():
    t, _ = normalise(HERMES_PARALLEL)
    assert [m["role"] for m in t.messages] == ["user", "assistant", "tool", "tool", "assistant"]
    calls = t.messages[1]["tool_calls"]
    assert [m["tool_call_id"] for m in t.messages[2:4]] == [calls[0]["id"], calls[1]["id"]]
    assert json.loads(t.messages[2]["content"])["content"] == {"temp": 24}
    assert json.loads(t.messages[3]["content"])["content"] == {"temp": 3}
    assert not any("tool_response" in m["content"] for m in t.messages if m["role"] == "tool")


def test_llama_factory_function_call_turns_and_system_key():
    obj = {"system": "Be brief.", "tools": '[{"name": "get_weather", "parameters": {"type": "object"}}]',
           "conversations": [{"from": "human", "value": "Rome?"},
                             {"from": "function_call", "value": '{"name": "get_weather", "arguments": {"city": "Rome"}}'},
                             {"from": "observation", "value": '{"temp": 24}'},
                             {"from": "gpt", "value": "24."}]}
    t, _ = normalise(obj)
    assert t.messages[0] == {"role": "system", "content": "Be brief."}
    call = t.messages[2]["tool_calls"][0]
    assert call["function"]["name"] == "get_weather" and t.messages[3]["tool_call_id"] == call["id"]


@pytest.mark.parametrize("conversations,path,expected", [
    ([{"from": "human", "value": "hi"}, {"from": "tool", "value": "42"}],
     "$.conversations[1].value", "no unanswered call before it"),
    ([{"from": "human", "value": "hi"}, {"from": "gpt", "value": '<tool_call>{"name": "f", "arguments": {}}</tool_call>'},
      {"from": "tool", "value": "<tool_response>1</tool_response><tool_response>2</tool_response>"}],
     "$.conversations[2].value", "result 2 of this turn"),
    ([{"from": "human", "value": "hi"}, {"from": "function_call", "value": "{not json"}],
     "$.conversations[1].value", "not JSON"),
    ([{"from": "human", "value": 5}], "$.conversations[0].value", "is not of type 'string'"),
    ([{"from": "system", "value": '<tools>[{"description": "no name"}]</tools>'}, {"from": "human", "value": "hi"}],
     "$.conversations[0].value", "in the <tools> block, tools[0].function: 'name' is a required property"),
])
def test_sharegpt_errors_name_the_users_own_turn_and_field(tmp_path, conversations, path, expected):
    f = tmp_path / "sg.jsonl"
    f.write_text(json.dumps({"id": "x", "conversations": conversations}) + "\n")
    with pytest.raises(TrajectoryError) as ei:
        load_trajectories(f)
    assert ei.value.path == path and expected in ei.value.expected
    assert "call_unknown" not in str(ei.value) and "$.messages" not in str(ei.value)


def test_assistant_prefill_is_allowed_and_must_start_the_content():
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<tool_call>\n{}", "prefill": "<tool_call>\n"}]
    t, _ = normalise({"id": "p", "messages": msgs})
    assert t.messages[1]["prefill"] == "<tool_call>\n"
    with pytest.raises(TrajectoryError) as ei:
        normalise({"id": "p", "messages": [msgs[0], {**msgs[1], "prefill": "Sure"}]})
    assert ei.value.path == "$.messages[1].prefill" and "start of 'content'" in ei.value.expected
    with pytest.raises(TrajectoryError, match=r"\$.messages\[1\].prefill: 3 is not of type 'string'"):
        normalise({"id": "p", "messages": [msgs[0], {**msgs[1], "prefill": 3}]})
