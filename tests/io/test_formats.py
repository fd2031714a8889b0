"""xLAM and OpenTelemetry GenAI spans: detected, normalised to the same Trajectory, errors named."""
import json
import random

import pytest

from opsd.io.formats.xlam import json_schema_type
from opsd.io.trajectories import (
    LoadSummary,
    TrajectoryError,
    load_trajectories,
    normalise,
    write_trajectories,
)
from tests.conftest import DATA

XLAM = DATA / "sample_xlam.json"
OTEL = DATA / "sample_otel.jsonl"


def _rejects(paths, tmp_path):
    s = LoadSummary()
    with open(tmp_path / "rej.jsonl", "w", encoding="utf-8") as rej:
        trajs = load_trajectories(paths, rejects=rej, summary=s)
    return trajs, s, [json.loads(x) for x in (tmp_path / "rej.jsonl").read_text("utf-8").splitlines()]


def _round_trip(trajs, tmp_path):
    out = tmp_path / "normalised.jsonl"
    write_trajectories(out, trajs)
    again = load_trajectories(out)
    assert [t.to_dict() for t in again] == [t.to_dict() for t in trajs]


# -- xLAM --------------------------------------------------------------------------------------------

def test_xlam_sample_is_detected_and_normalised(tmp_path):
    source = json.loads(XLAM.read_text())
    s = LoadSummary()
    trajs = load_trajectories(XLAM, summary=s)
    assert s.per_format["xlam"] == len(source) == len(trajs) and s.rejected == 0
    for rec, t in zip(source, trajs):
        assert t.id == str(rec["id"])
        assert t.messages[0] == {"role": "user", "content": rec["query"]}
        calls = t.messages[1]["tool_calls"]
        answers = json.loads(rec["answers"])
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == \
               [(a["name"], a["arguments"]) for a in answers]
        assert len({c["id"] for c in calls}) == len(calls)
        assert [x["function"]["name"] for x in t.tools] == [x["name"] for x in json.loads(rec["tools"])]
    _round_trip(trajs, tmp_path)


def test_xlam_parameters_become_json_schema():
    t, fmt = normalise(json.loads(XLAM.read_text())[2])
    params = t.tools[0]["function"]["parameters"]
    assert fmt == "xlam" and params["type"] == "object"
    assert params["properties"]["symbol"] == {"type": "string", "description": "Ticker symbol, e.g. AAPL."}
    assert params["required"] == ["symbol"]  # "str, optional" with a default is not required
    t, _ = normalise(json.loads(XLAM.read_text())[1])
    binary = t.tools[1]["function"]["parameters"]["properties"]
    assert binary["arr"]["type"] == "array" and binary["arr"]["items"] == {"type": "integer"}


@pytest.mark.parametrize("xtype,schema", [
    ("str", {"type": "string"}), ("int, optional", {"type": "integer"}), ("float", {"type": "number"}),
    ("List[str]", {"type": "array", "items": {"type": "string"}}), ("Dict[str, Any]", {"type": "object"}),
    ("Optional[bool]", {"type": "boolean"}), ("Callable", {}), ("Tuple[int, int]", {"type": "array", "items": {"type": "integer"}}),
])
def test_xlam_type_strings(xtype, schema):
    assert json_schema_type(xtype) == schema


@pytest.mark.parametrize("change,path,expected", [
    ({"answers": "[{\"name\": \"f\", "}, "$[1].answers", "not JSON"),
    ({"answers": "[{\"arguments\": {}}]"}, "$[1].answers[0]", "non-empty string 'name'"),
    ({"answers": "[]"}, "$[1].answers", "at least one call"),
    ({"tools": "[{\"description\": \"no name\"}]"}, "$[1].tools[0]", "non-empty string 'name'"),
    ({"tools": "[{\"name\": \"f\", \"parameters\": {\"x\": \"int\"}}]"}, "$[1].tools[0].parameters.x", "parameter spec object"),
    ({"query": 7}, "$[1].query", "the user's request as a string"),
])
def test_xlam_errors_name_file_element_line_and_field(tmp_path, change, path, expected):
    rows = json.loads(XLAM.read_text())[:3]
    rows[1].update(change)
    f = tmp_path / "xlam.json"
    f.write_text(json.dumps(rows, indent=4))
    trajs, s, rej = _rejects(f, tmp_path)
    assert [t.id for t in trajs] == ["0", "2"] and s.rejected == 1  # the valid elements are kept
    r = rej[0]
    assert (r["file"], r["path"]) == (str(f), path) and expected in r["error"]
    assert f.read_text().splitlines()[r["line"] - 1].strip() == "{"  # the line where element [1] starts


def test_xlam_as_json_lines_too(tmp_path):
    f = tmp_path / "xlam.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in json.loads(XLAM.read_text())) + "\n")
    assert [t.to_dict() for t in load_trajectories(f)] == [t.to_dict() for t in load_trajectories(XLAM)]


# -- OpenTelemetry GenAI spans ---------------------------------------------------------------------

def _spans(path=OTEL):
    """Every span of the sample with the request around it: [(resource, scope, span)]."""
    out = []
    for line in path.read_text().splitlines():
        for rs in json.loads(line)["resourceSpans"]:
            for ss in rs["scopeSpans"]:
                out += [(rs["resource"], ss["scope"], sp) for sp in ss["spans"]]
    return out


def _write_requests(path, groups):
    path.write_text("".join(json.dumps({"resourceSpans": [{"resource": g[0][0], "scopeSpans": [
        {"scope": g[0][1], "spans": [sp for _, _, sp in g]}]}]}) + "\n" for g in groups if g))


def test_otel_sample_gives_one_trajectory_per_trace(tmp_path):
    s = LoadSummary()
    trajs = {t.id: t for t in load_trajectories(OTEL, summary=s)}
    assert s.per_format["otel"] == 2 and s.rejected == 0
    weather = trajs["5b8efff798038103d269b633813fc60c"]
    assert [m["role"] for m in weather.messages] == ["system", "user", "assistant", "tool", "assistant"]
    assert weather.messages[0]["content"] == "You are a travel assistant. Use the tools."
    call = weather.messages[2]["tool_calls"][0]
    assert call["id"] == "call_VSPygqKTWdrhaFErNvMV18Yl" and json.loads(call["function"]["arguments"]) == {"city": "Paris"}
    assert weather.messages[3] == {"role": "tool", "tool_call_id": call["id"], "content": "rainy, 57°F"}
    assert weather.messages[4]["content"] == "It is rainy in Paris, 57°F."
    assert [t["function"]["name"] for t in weather.tools] == ["get_weather", "search_flights"]
    assert weather.meta["agent"] == "travel_assistant" and weather.meta["model"] == "gpt-4o-2024-08-06"
    flights = trajs["0af7651916cd43dd8448eb211c80319c"]
    # no later model call shows the tool result: it comes from the execute_tool span
    assert flights.messages[-1]["role"] == "tool" and "missing required parameter" in flights.messages[-1]["content"]
    assert flights.messages[-1]["tool_call_id"] == flights.messages[-2]["tool_calls"][0]["id"]
    _round_trip(list(trajs.values()), tmp_path)


@pytest.mark.parametrize("seed", range(4))
def test_otel_spans_in_any_order_and_on_any_line_give_the_same_trajectories(tmp_path, seed):
    expected = {t.id: t.to_dict() for t in load_trajectories(OTEL)}
    spans = _spans()
    random.Random(seed).shuffle(spans)
    cut = sorted(random.Random(seed + 100).sample(range(1, len(spans)), 3))
    f = tmp_path / "shuffled.jsonl"
    _write_requests(f, [spans[a:b] for a, b in zip([0] + cut, cut + [len(spans)])])
    assert {t.id: t.to_dict() for t in load_trajectories(f)} == expected


def test_otel_spans_split_across_files_are_one_trace(tmp_path):
    spans = _spans()
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    _write_requests(a, [spans[:3]])
    _write_requests(b, [spans[3:]])
    assert {t.id for t in load_trajectories([a, b])} == {t.id for t in load_trajectories(OTEL)}


def _structured(value):
    """A JSON value as an OTLP AnyValue (arrayValue/kvlistValue), as SDKs that support complex attributes write it."""
    if isinstance(value, dict):
        return {"kvlistValue": {"values": [{"key": k, "value": _structured(v)} for k, v in value.items()]}}
    if isinstance(value, list):
        return {"arrayValue": {"values": [_structured(v) for v in value]}}
    if isinstance(value, bool):
        return {"boolValue": value}
    if isinstance(value, int):
        return {"intValue": str(value)}
    return {"stringValue": value}


def test_otel_structured_attributes_equal_json_string_attributes(tmp_path):
    lines = []
    for line in OTEL.read_text().splitlines():
        req = json.loads(line)
        for rs in req["resourceSpans"]:
            for ss in rs["scopeSpans"]:
                for sp in ss["spans"]:
                    for a in sp["attributes"]:
                        if a["key"] in ("gen_ai.input.messages", "gen_ai.output.messages", "gen_ai.tool.definitions"):
                            a["value"] = _structured(json.loads(a["value"]["stringValue"]))
        lines.append(json.dumps(req))
    f = tmp_path / "structured.jsonl"
    f.write_text("\n".join(lines) + "\n")
    assert [t.to_dict() for t in load_trajectories(f)] == [t.to_dict() for t in load_trajectories(OTEL)]


def test_otel_duplicate_export_of_the_same_spans_counts_once(tmp_path):
    f = tmp_path / "twice.jsonl"
    f.write_text(OTEL.read_text() * 2)
    trajs = load_trajectories(f)
    assert [t.messages for t in trajs] == [t.messages for t in load_trajectories(OTEL)]
    assert all(t.meta["duplicate_spans"] > 0 for t in trajs)


def _span(trace, span_id, parent, start, op, **attrs):
    attributes = [{"key": "gen_ai.operation.name", "value": {"stringValue": op}}]
    attributes += [{"key": k.replace("__", "."), "value": {"stringValue": v if isinstance(v, str) else json.dumps(v)}}
                   for k, v in attrs.items()]
    return {"traceId": trace, "spanId": span_id, "parentSpanId": parent, "name": op,
            "startTimeUnixNano": str(start), "endTimeUnixNano": str(start + 5), "attributes": attributes}


def _msg(role, text):
    return {"role": role, "parts": [{"type": "text", "content": text}]}


def test_otel_a_sub_agent_conversation_in_the_same_trace_is_its_own_trajectory(tmp_path):
    t = "ab" * 16
    spans = [_span(t, "01", "", 0, "invoke_agent"),
             _span(t, "02", "01", 10, "chat", gen_ai__input__messages=[_msg("user", "plan a trip")],
                   gen_ai__output__messages=[_msg("assistant", "asking the flights agent")]),
             _span(t, "03", "01", 20, "invoke_agent"),
             _span(t, "04", "03", 30, "chat", gen_ai__input__messages=[_msg("user", "flights SFO-JFK")],
                   gen_ai__output__messages=[_msg("assistant", "UA 1")]),
             _span(t, "05", "01", 40, "chat", gen_ai__input__messages=[_msg("user", "plan a trip"),
                                                                       _msg("assistant", "asking the flights agent"),
                                                                       _msg("user", "flights agent says UA 1")],
                   gen_ai__output__messages=[_msg("assistant", "Take UA 1.")])]
    f = tmp_path / "agents.jsonl"
    f.write_text(json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": spans}]}]}) + "\n")
    trajs = {x.id: x for x in load_trajectories(f)}
    assert set(trajs) == {t, t + "#2"}
    assert [m["content"] for m in trajs[t].messages] == ["plan a trip", "asking the flights agent",
                                                        "flights agent says UA 1", "Take UA 1."]
    assert [m["content"] for m in trajs[t + "#2"].messages] == ["flights SFO-JFK", "UA 1"]


def test_otel_malformed_span_is_a_reject_and_the_rest_of_the_line_loads(tmp_path):
    spans = _spans()
    del spans[1][2]["traceId"]
    f = tmp_path / "bad.jsonl"
    _write_requests(f, [spans])
    trajs, s, rej = _rejects(f, tmp_path)
    assert s.rejected >= 1
    first = rej[0]
    assert (first["file"], first["line"], first["path"]) == (str(f), 1, "$.resourceSpans[0].scopeSpans[0].spans[1].traceId")
    assert "traceId" in first["error"] and "hex string" in first["error"]
    assert "0af7651916cd43dd8448eb211c80319c" in {t.id for t in trajs}  # the other trace is untouched


def test_otel_trace_with_no_model_call_names_file_line_and_what_was_expected(tmp_path):
    t = "cd" * 16
    f = tmp_path / "tools_only.jsonl"
    ok = json.dumps({"id": "kept", "messages": [{"role": "user", "content": "hi"}]})
    f.write_text(ok + "\n" + json.dumps({"resourceSpans": [{"scopeSpans": [{"spans": [
        _span(t, "01", "", 0, "invoke_agent"), _span(t, "02", "01", 5, "execute_tool", gen_ai__tool__name="f"),
        _span(t, "03", "01", 9, "chat")]}]}]}) + "\n")
    trajs, s, rej = _rejects(f, tmp_path)
    assert [x.id for x in trajs] == ["kept"] and s.rejected == 1
    r = rej[0]
    assert (r["file"], r["line"], r["path"]) == (str(f), 2, "$.resourceSpans[0].scopeSpans[0].spans[0]")
    assert f"trace {t}: a model call" in r["error"] and "1 execute_tool" in r["error"]
    assert "content capture" in r["error"]  # the chat span exists but carries no messages


def test_otel_bad_messages_attribute_names_the_span_attribute(tmp_path):
    spans = _spans()
    chat = next(sp for _, _, sp in spans if sp["spanId"] == "00f067aa0ba902b7")
    attr = next(a for a in chat["attributes"] if a["key"] == "gen_ai.output.messages")
    attr["value"] = {"stringValue": '[{"role": "assistant", "parts": [{"type": "tool_call", "arguments": {}}]}]'}
    f = tmp_path / "bad_parts.jsonl"
    _write_requests(f, [spans[:3], spans[3:]])
    trajs, s, rej = _rejects(f, tmp_path)
    assert {t.id for t in trajs} == {"5b8efff798038103d269b633813fc60c"} and s.rejected == 1
    k = chat["attributes"].index(attr)
    line = 1 if any(sp is chat for _, _, sp in spans[:3]) else 2
    assert rej[0]["line"] == line and rej[0]["path"].startswith("$.resourceSpans[0].scopeSpans[0].spans[")
    assert f".attributes[{k}].value (gen_ai.output.messages)[0].parts[0].name" in rej[0]["path"]


def test_unknown_format_and_otlp_metrics_name_file_line_and_expected_shapes(tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_text(json.dumps({"prompt": "hi", "completion": "ho"}) + "\n"
                 + json.dumps({"resourceMetrics": []}) + "\n"
                 + json.dumps({"id": "ok", "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    trajs, s, rej = _rejects(f, tmp_path)
    assert [t.id for t in trajs] == ["ok"]
    assert rej[0]["line"] == 1 and "'query' and 'answers' (xLAM)" in rej[0]["error"] and "'prompt'" in rej[0]["error"]
    assert rej[1]["line"] == 2 and "OTLP metrics or logs" in rej[1]["error"]


def test_normalise_reads_a_single_trace_request():
    spans = [sp for _, _, sp in _spans() if sp["traceId"] == "5b8efff798038103d269b633813fc60c"]
    t, fmt = normalise({"resourceSpans": [{"scopeSpans": [{"spans": spans}]}]})
    assert fmt == "otel" and t.id == "5b8efff798038103d269b633813fc60c" and len(t.messages) == 5
    with pytest.raises(TrajectoryError, match="one trace"):
        normalise({"resourceSpans": [{"scopeSpans": [{"spans": [sp for _, _, sp in _spans()]}]}]})
