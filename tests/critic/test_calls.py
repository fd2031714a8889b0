"""Position-tracking JSON parser and tool-call blocks: spans slice back to the exact source text."""
import json

from hypothesis import given, settings
from hypothesis import strategies as st

from critic.calls import extract_calls, parse_value, unique_quote

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-10**6, 10**6) | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8),
    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=5), kids, max_size=4),
    max_leaves=12)


def _check_spans(node, text):
    assert json.loads(text[node.start:node.end]) == node.value
    for f in node.fields.values():
        assert json.loads(text[f.key_span[0]:f.key_span[1]]) == f.key
        _check_spans(f.value, text)
    for it in node.items:
        _check_spans(it, text)


@settings(max_examples=200, deadline=None)
@given(json_values, st.sampled_from([None, 1]), st.booleans())
def test_parse_value_matches_json_and_spans_slice_back(value, indent, ascii_):
    text = "xx " + json.dumps(value, indent=indent, ensure_ascii=ascii_)
    node = parse_value(text, 3)
    assert node.value == value
    assert node.end == len(text)
    _check_spans(node, text)


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet="ab\"{} ", min_size=1, max_size=30), st.data())
def test_unique_quote_first_occurrence_covers_the_span(text, data):
    a = data.draw(st.integers(0, len(text) - 1))
    b = data.draw(st.integers(a + 1, len(text)))
    q = unique_quote(text, a, b)
    first = text.find(q)  # what Rendered.quote_span maps
    assert first <= a and first + len(q) >= b
    # minimal on the left: no shorter widening already had its first occurrence in place
    if first < a:
        assert text.find(text[first + 1:first + len(q)]) < first + 1 or first + len(q) > b


def test_extract_calls_positions_and_truncation():
    text = 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"x": 1, "y": "a"}}\n</tool_call>\n<tool_call>\n{"name": "g", "arg'
    a, b = extract_calls(text)
    assert a.ok and a.closed and a.name == "f" and text[a.name_span[0]:a.name_span[1]] == "f"
    y = a.args.fields["y"]
    assert text[y.value.start:y.value.end] == '"a"' and text[y.key_span[0]:y.key_span[1]] == '"y"'
    assert not b.ok and not b.closed and b.error_pos == text.rindex('"arg')  # where the unterminated string starts


def test_parameters_alias_and_missing_name():
    (c,) = extract_calls('<tool_call>\n{"name": "f", "parameters": {"k": true}}\n</tool_call>')
    assert c.ok and c.args.value == {"k": True}
    (d,) = extract_calls('<tool_call>\n{"arguments": {}}\n</tool_call>')
    assert not d.ok and "name" in d.error
