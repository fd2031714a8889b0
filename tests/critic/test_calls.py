"""Position-tracking JSON parser and tool-call blocks: spans slice back to the exact source text."""
import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from opsd_critic.calls import (
    extract_calls,
    in_generated,
    json_error_span,
    parse_value,
    token_span,
)

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


@pytest.mark.parametrize("text, pos, quote", [
    ('{"a": 1 2}', 8, "2"),  # the token at the error, not the correct `1` before it
    ('{"name": "x" "arguments": {}}', 13, '"arguments"'),  # a whole string literal
    ('{"a": 1\n</tool_call>', 8, "</tool_call>"),  # closed before the object was
    ('{"a": tru}', 6, "tru"),
    ('{"a": -}', 6, "-"),
    ('{"a": 12.5e3x}', 6, "12.5e3"),
    ('{"a": "unterminated and long enough to be cut at forty chars', 6,
     '"unterminated and long enough to be cut '),
    ('{"a": "line\nnext', 6, '"line'),
])
def test_json_error_span_is_the_token_at_the_error(text, pos, quote):
    a, b = json_error_span(text, pos, 0)
    assert (text[a:b], a) == (quote, pos)


@pytest.mark.parametrize("text, start, quote", [
    ('<tool_call>\n{"a": "Paris"', 12, '"'),  # cut off: the last generated char (quote_span: its token)
    ('<tool_call>\n{"a": 15', 12, "5"),
    ('<tool_call>\n{"a": 1,\n  ', 12, ",\n  "),  # ... and the whitespace after it
    ('<tool_call>\n  \n', 12, "  \n"),  # only whitespace was generated: that is the quote
])
def test_cut_off_quotes_the_last_generated_char(text, start, quote):
    a, b = json_error_span(text, len(text), start)
    assert (text[a:], b) == (quote, len(text))


def test_nothing_generated_after_the_prefill_has_no_quote():
    text = "<tool_call>\n"
    assert json_error_span(text, len(text), len(text)) is None
    assert json_error_span(text, len(text), 0) == (10, 12)  # without a prefill the tag's end is generated
    assert token_span(text, len(text)) is None
    assert in_generated((3, 12), 12) is None and in_generated((3, 14), 12) == (12, 14)
    assert in_generated(None, 0) is None and in_generated((5, 9), 0) == (5, 9)


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


@settings(max_examples=200, deadline=None)
@given(json_values)
def test_parse_value_on_compact_json(value):
    """No spaces after ':' and ',' (json.dumps(separators=(",", ":"))): every offset must be exact."""
    text = json.dumps(value, separators=(",", ":"))
    node = parse_value(text, 0)
    assert node.value == value and node.end == len(text)
    _check_spans(node, text)


@pytest.mark.parametrize("body, error, at", [
    ("{", "expecting a property name in double quotes", "$"),
    ('{"a"', "expecting ':' after a property name", "$"),
    ('{"a": ', "expecting a value, text ended", "$"),
    ('{"a": 1 2}', "expecting ',' or '}' in an object", "2}"),
    ('{"a": [1 2]}', "expecting ',' or ']' in an array", "2]"),
    ('{"a": [', "expecting a value, text ended", "$"),
    ('{"a": @}', "expecting a JSON value", "@}"),
    ('{"a": "x\x01y"}', "invalid control character", "\x01y"),
    ('{"a": "unterminated', "unterminated string", '"unterminated'),
    ('{"name": "f", "arguments": {}} extra', "extra text after the call object", "extra"),
    ('["f"]', "the call is not a JSON object", '["f"]'),
    ('{"arguments": {}}', "the call has no string 'name'", "last:}"),
    ('{"name": 5, "arguments": {}}', "the call has no string 'name'", "5, "),
    ('{"name": "f", "arguments": {"l": [{"a": 1, "a": 1, "a', "a key is repeated (a generation loop)", 'last:"a": 1, "a'),
])
def test_decoder_errors_and_their_positions(body, error, at):
    """The exact problem text (it goes into hints) and position ("$": the end of the text)."""
    text = "<tool_call>\n" + body
    (b,) = extract_calls(text)
    assert b.error == error
    want = len(text) if at == "$" else text.rindex(at[5:]) if at.startswith("last:") else text.index(at)
    assert b.error_pos == want


def test_json_pos_error_names_the_char():
    from opsd_critic.calls import JsonPosError, render_value

    assert str(JsonPosError("expecting a value", 7)) == "expecting a value (char 7)"
    assert render_value("Zürich") == '"Zürich"' and render_value([1, None]) == "[1, null]"
    assert parse_value("1E5", 0).value == 100000.0 and parse_value("-0.5e-1", 0).value == -0.05
    assert parse_value("12", 0).value == 12 and isinstance(parse_value("12", 0).value, int)


def test_blocks_positions_indices_and_leading_names():
    first = '<tool_call>\n{"name": "f", "arguments": {"a": "x<tool_call>y"}}\n</tool_call>'
    text = first + "\n<tool_call>\n{\"name\": \"g\"\n\n<tool_call>\n{}\n</tool_call>"
    a, rest, b, c = extract_calls(text)
    assert [x.index for x in (a, rest, b, c)] == [0, 1, 2, 3]
    assert rest.start == a.end and rest.closed and rest.end == len(first)
    # an OPEN tag inside a string cuts the first block there (no closing tag before it)
    assert not a.closed and a.end == text.index("<tool_call>y") and a.error == "unterminated string"
    assert a.name == "f"  # a cut-off call still names its function
    assert b.start == text.index('<tool_call>\n{"name": "g"') and b.end == text.rindex("<tool_call>")
    assert not b.closed and b.name == "g" and b.error_pos == b.end  # the name right before the cut
    assert c.closed and c.end == len(text) and c.error == "the call has no string 'name'"
    (d,) = extract_calls('Sure.\n<tool_call>\n{"name": "nope", "arguments": {"x": ')
    assert d.name == "nope" and not d.closed
    (e,) = extract_calls('<tool_call>\n{"name": "nope"')  # cut right after the name
    assert e.name == "nope" and e.error_pos == len('<tool_call>\n{"name": "nope"')


@pytest.mark.parametrize("text, span", [
    ('"a\nb"', (0, 2)),  # a raw newline is not allowed in a JSON string: unterminated, to the line's end
    ('"abc\nd\ne', (0, 4)),
    ('"\nabc', (0, 1)),
    ('"abcdef', (0, 7)),
    ('"closed" x', (0, 8)),
    ("-12.5e3,", (0, 7)),
    ("true}", (0, 4)),
    ("}", (0, 1)),
])
def test_token_span(text, span):
    assert token_span(text, 0) == span
