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
    ('{"id": "x"}', "$", "expected a JSON object with 'messages'"),
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
    ('{"conversations": [{"from": "system", "value": "<tools>[{broken</tools>"}]}', "$.conversations", "not JSON"),
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
