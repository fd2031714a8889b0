"""Schema critic: localises every error class of the data/ samples with a precise, unique quote."""
import asyncio
import copy

import pytest

from opsd_critic.base import render_hint
from opsd_critic.schema import SchemaCritic
from opsd_critic.validate import check_critique, lint_hint
from opsd.render import message_text
from opsd.types import Trajectory

# id -> (step, category, quote, the text right before the quote); quotes are the error tokens (data/README.md)
EXPECTED = {
    "weather-unknown-tool": (2, "unknown_tool", "weather.get_current", '{"name": "'),
    "flights-missing-arg": (2, "missing_required", "}", '"passengers": 2'),
    "flights-wrong-type": (2, "type_mismatch", '"three"', '"passengers": '),
    "currency-bad-json": (1, "invalid_json", "</tool_call>", '"EUR"}\n'),
    "weather-enum": (2, "enum_violation", "kelvin", '"unit": "'),
    "currency-tool-error": (1, "unknown_parameter", "rate", '"JPY", "'),
    "sg-flights-missing-arg": (1, "missing_required", "}", '"origin": "NRT"'),
    "sg-unknown-tool": (1, "unknown_tool", "get_forecast", '{"name": "'),
}
CLEAN = ("weather-ok", "multi-turn-ok", "sg-weather-ok", "sample_messages.jsonl:1", "sample_messages.jsonl:2")


def _check(t):
    return check_critique(SchemaCritic().check(t), t)


@pytest.mark.parametrize("tid", sorted(EXPECTED))
def test_localises_sample_errors(samples, tid):
    c = _check(samples[tid])
    step, category, quote, before = EXPECTED[tid]
    assert (c.verdict, c.step, c.category, c.quote) == ("error", step, category, quote), c
    text = message_text(samples[tid].messages[step])
    assert text[c.quote_at:c.quote_at + len(quote)] == quote and text[:c.quote_at].endswith(before)
    assert lint_hint(c.hint, c.quote) is None


@pytest.mark.parametrize("tid", CLEAN)
def test_clean_samples_are_ok(samples, tid):
    assert _check(samples[tid]).verdict == "ok"


def test_hints_point_to_the_fix(samples):
    assert "get_weather, search_flights" in _check(samples["weather-unknown-tool"]).hint
    assert "`destination`" in _check(samples["flights-missing-arg"]).hint
    assert "integer" in _check(samples["flights-wrong-type"]).hint
    assert '"celsius", "fahrenheit"' in _check(samples["weather-enum"]).hint
    assert "amount, from_currency, to_currency" in _check(samples["currency-tool-error"]).hint


def _with_calls(t, text_or_calls, extra=()):
    step = {"role": "assistant", "content": text_or_calls, "token_ids": [0]}
    return Trajectory(t.id + "-x", [m for m in t.messages if m["role"] != "assistant"][:2] + [step, *extra], t.tools)


def test_tool_error_localises_the_argument_the_tool_names(samples):
    base = samples["weather-ok"]
    t = _with_calls(base, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Atlantis"}}\n</tool_call>',
                    [{"role": "tool", "tool_call_id": "call_0", "content": '{"error": "unknown city Atlantis"}'}])
    c = _check(t)
    assert (c.verdict, c.category, c.quote) == ("error", "tool_error", "Atlantis")
    assert "`city`" in c.hint and "atlantis" not in c.hint.lower()


def test_tool_error_text_result_without_a_named_argument(samples):
    base = samples["weather-ok"]
    t = _with_calls(base, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>',
                    [{"role": "tool", "tool_call_id": "call_0", "content": "Error: service unavailable"}])
    c = _check(t)
    assert (c.verdict, c.category, c.quote) == ("error", "tool_error", '{"city": "Paris"}')


def test_truncated_raw_output_is_unparsable_call(samples):
    t = _with_calls(samples["weather-ok"], '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Par')
    c = _check(t)
    assert (c.verdict, c.step, c.category) == ("error", 2, "unparsable_call")
    assert c.quote in message_text(t.messages[2])


def test_earliest_error_in_the_text_wins_and_repeated_quotes_carry_their_offset(samples):
    # "town" occurs in the prose before the call too: quote_at says which occurrence is the error
    text = 'town?\n<tool_call>\n{"name": "get_weather", "arguments": {"unit": "celsius", "town": "celsius"}}\n</tool_call>'
    t = _with_calls(samples["weather-ok"], text)
    c = _check(t)
    assert (c.category, c.quote, c.quote_at) == ("unknown_parameter", "town", text.index('"town"') + 1)
    # a type error before a missing required parameter is reported first
    t2 = _with_calls(samples["weather-ok"], '<tool_call>\n{"name": "search_flights", "arguments": {"origin": 5}}\n</tool_call>')
    assert _check(t2).category == "type_mismatch"


def test_nested_schema_errors_and_constraints(samples):
    tools = copy.deepcopy(samples["weather-ok"].tools)
    tools[1]["function"]["parameters"]["properties"]["legs"] = {
        "type": "array", "items": {"type": "object", "properties": {"day": {"type": "integer"}}, "required": ["day"]}}
    base = Trajectory("n", samples["weather-ok"].messages[:2], tools)
    t = _with_calls(base, '<tool_call>\n{"name": "search_flights", "arguments": {"origin": "A", "destination": "B", '
                          '"legs": [{"day": 1}, {"day": "two"}]}}\n</tool_call>')
    c = _check(t)
    assert (c.category, c.quote) == ("type_mismatch", '"two"') and "legs[1].day" in c.hint
    text2 = ('<tool_call>\n{"name": "search_flights", "arguments": {"origin": "A", "destination": "B", '
             '"passengers": 0}}\n</tool_call>')
    c2 = _check(_with_calls(base, text2))
    assert (c2.category, c2.quote, c2.quote_at) == ("constraint_violation", "0", text2.index("0}"))
    assert "`passengers`" in c2.hint and "minimum 1" in c2.hint


def test_calls_without_declared_tools_fail_with_reason():
    t = Trajectory("nt", [{"role": "user", "content": "hi"},
                          {"role": "assistant", "content": '<tool_call>\n{"name": "f", "arguments": {}}\n</tool_call>',
                           "token_ids": [0]}])
    c = _check(t)
    assert c.verdict == "failed" and "declares no tools" in c.error


def test_long_tool_lists_are_truncated_in_the_hint(samples):
    tools = [{"type": "function", "function": {"name": f"tool_number_{i}", "parameters": {"type": "object"}}}
             for i in range(40)]
    t = Trajectory("many", [{"role": "user", "content": "x"},
                            {"role": "assistant", "content": '<tool_call>\n{"name": "nope", "arguments": {}}\n</tool_call>',
                             "token_ids": [0]}], tools)
    c = _check(t)
    assert c.verdict == "error" and c.category == "unknown_tool" and "..." in c.hint


def test_hint_templates_are_strict():
    with pytest.raises(Exception):
        render_hint("missing_required", function="f")  # parameter undefined
    with pytest.raises(ValueError, match="no hint template"):
        render_hint("no_such_category")


def test_async_protocol(samples):
    c = asyncio.run(SchemaCritic().critique(samples["weather-enum"]))
    assert c.category == "enum_violation" and c.critic["name"] == "schema" and len(c.critic["config_hash"]) == 16


def test_truncated_repetition_loop_quotes_the_first_repeated_key(samples):
    text = '<tool_call>\n{"name": "search_flights", "arguments": {"origin": "A", "destination": "B", "origin": "A", "origin": "A", "ori'
    t = _with_calls(samples["weather-ok"], text)
    c = _check(t)
    assert c.category == "unparsable_call" and "repeated" in c.hint
    first_repeat = text.index('"origin"', text.index('"origin"') + 1)
    assert (c.quote, c.quote_at) == ('"origin"', first_repeat)


@pytest.mark.parametrize("text, quote", [
    ('<tool_call>\n{"name": "get_weather" "arguments": {"city": "Oslo"}}\n</tool_call>', '"arguments"'),
    ('<tool_call>\n{"name": "get_weather", "name": "get_weather", "name": "get_weather", "na', '"name"'),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}, "arguments": {"city": "Oslo"}, "argu',
     '"arguments"'),
])
def test_a_quoted_json_key_still_gets_a_hint_that_passes_the_lint(samples, text, quote):
    """Issue 10, 2(a): the JSON hints name "name" and "arguments"; when that is the quote, a variant
    that names no key is used, so the error is trained on instead of becoming `failed`."""
    c = _check(_with_calls(samples["weather-ok"], text))
    assert (c.verdict, c.quote) == ("error", quote), c.error
    assert "JSON" in c.hint and lint_hint(c.hint, c.quote) is None


def test_tool_error_of_a_call_without_arguments_quotes_its_closing_brace():
    tools = [{"type": "function", "function": {"name": "ping", "parameters": {"type": "object", "properties": {}}}}]
    text = '<tool_call>\n{"name": "ping"}\n</tool_call>'
    t = Trajectory("p", [{"role": "user", "content": "ping"},
                         {"role": "assistant", "content": text, "token_ids": [0], "tool_calls": [{"id": "c0"}]},
                         {"role": "tool", "tool_call_id": "c0", "content": "Error: host unreachable"}], tools)
    c = _check(t)
    assert (c.verdict, c.category, c.quote, c.quote_at) == ("error", "tool_error", "}", text.index("}"))


@pytest.mark.parametrize("text, category, quote, hint_has", [
    # the round-2 student of the demo echoes the tool's schema inside "arguments" and is cut off far later
    ('<tool_call>\n{"name": "get_weather", "arguments": {\n    "type": "function",\n    "function": {"name": "get_w',
     "unknown_parameter", "type", "city"),
    ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "description": "Get the current weath',
     "unknown_parameter", "description", "city"),
    ('<tool_call>\n{"name": "get_weather", "arguments": [\n    {"type": "function", "function": {"name": "get_w',
     "type_mismatch", "[", "object"),
])
def test_a_call_that_never_parsed_is_checked_inside_its_arguments(samples, text, category, quote, hint_has):
    """The error starts at the first undeclared key (or the list), long before the cut-off: that is what is quoted
    and trained on, not the unterminated string at the token limit."""
    t = _with_calls(samples["weather-ok"], text)
    c = _check(t)
    assert (c.verdict, c.category, c.quote) == ("error", category, quote), (c.category, c.quote, c.error)
    assert c.quote_at == text.index(quote, text.index('"arguments"'))
    assert hint_has in c.hint and lint_hint(c.hint, c.quote) is None


def test_a_cut_off_call_with_declared_keys_only_stays_unparsable(samples):
    t = _with_calls(samples["weather-ok"], '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "unit": "cel')
    c = _check(t)
    assert c.category == "unparsable_call"


# ---- repeated calls and made-up values (issue 24 item 8): a customer-support agent's own tools

SUPPORT_TOOLS = [{"type": "function", "function": {"name": n, "description": d, "parameters": {
    "type": "object", "properties": p, "required": list(p)}}} for n, d, p in [
    ("lookup_order", "Order status and total.", {"order_id": {"type": "string"}}),
    ("refund", "Refund an order.", {"order_id": {"type": "string"}, "amount": {"type": "number"}}),
    ("send_email", "Email the customer.", {"to": {"type": "string"}, "body": {"type": "string"}})]]
SYSTEM = {"role": "system", "content": "You are a support agent for a shop."}
ORDER = '{"order_id": "ORD-1042", "status": "delivered", "total": 89.99, "email": "Alice.M@example.com"}'


def _call(name: str, args: str, k: int = 0) -> dict:
    return {"role": "assistant", "content": None, "tool_calls": [
        {"id": f"c{k}", "type": "function", "function": {"name": name, "arguments": args}}]}


def _result(content: str, k: int = 0) -> dict:
    return {"role": "tool", "tool_call_id": f"c{k}", "content": content}


def _support(*messages) -> Trajectory:
    return Trajectory("support", [SYSTEM, {"role": "user", "content": "Please refund order ORD-1042 and email me."},
                                  *messages], SUPPORT_TOOLS)


LOOKUP = _call("lookup_order", '{"order_id": "ORD-1042"}')
SUPPORT_CASES = {  # name -> (messages after the user turn, category, marked step text or None for ok)
    "repeated lookup": ([LOOKUP, _result(ORDER), _call("lookup_order", '{"order_id": "ORD-1042"}', 1)],
                        "repeated_call", '«<tool_call>»\n{"name": "lookup_order", "arguments": {"order_id": "ORD-1042"}}\n</tool_call>'),
    "made-up id": ([_call("lookup_order", '{"order_id": "ORD-7731"}')],
                   "made_up_value", '<tool_call>\n{"name": "lookup_order", "arguments": {"order_id": "«ORD-7731»"}}\n</tool_call>'),
    "made-up amount": ([LOOKUP, _result(ORDER), _call("refund", '{"order_id": "ORD-1042", "amount": 120.0}', 1)],
                       "made_up_value", '<tool_call>\n{"name": "refund", "arguments": {"order_id": "ORD-1042", "amount": «120.0»}}\n</tool_call>'),
    "made-up email": ([LOOKUP, _result(ORDER), _call("send_email", '{"to": "john.doe@example.com", "body": "Refunded."}', 1)],
                      "made_up_value", '<tool_call>\n{"name": "send_email", "arguments": {"to": "«john.doe@example.com»", "body": "Refunded."}}\n</tool_call>'),
    # clean: values from the request and the tool result (the email in another case, the amount as 89.99)
    "clean": ([LOOKUP, _result(ORDER), _call("refund", '{"order_id": "ORD-1042", "amount": 89.99}', 1),
               _result('{"refunded": true}', 1), _call("send_email", '{"to": "alice.m@example.com", "body": "Done."}', 2),
               _result('{"sent": true}', 2), {"role": "assistant", "content": "Refunded 89.99 and emailed you."}], None, None),
    "clean: the same call after a new request": ([LOOKUP, _result(ORDER), {"role": "assistant", "content": "Delivered."},
                                                   {"role": "user", "content": "Can you check ORD-1042 again?"},
                                                   _call("lookup_order", '{"order_id": "ORD-1042"}', 1)], None, None),
    "clean: a retry after an error result is the tool_error of the first call, not a repeat": (
        [LOOKUP, _result('{"error": "timeout"}'), _call("lookup_order", '{"order_id": "ORD-1042"}', 1)], "tool_error",
        '<tool_call>\n{"name": "lookup_order", "arguments": «{"order_id": "ORD-1042"}»}\n</tool_call>'),
}


@pytest.mark.parametrize("case", list(SUPPORT_CASES))
def test_repeated_calls_and_made_up_values(case):
    messages, category, marked = SUPPORT_CASES[case]
    t = _support(*messages)
    c = _check(t)
    if category is None:
        assert c.verdict == "ok", (c.category, c.quote)
        return
    text = message_text(t.messages[c.step])
    want = marked.index("«")
    last = max(i for i, m in enumerate(t.messages) if m["role"] == "assistant" and (category != "tool_error" or i < 4))
    assert (c.verdict, c.category, c.step) == ("error", category, last)
    assert text == marked.replace("«", "").replace("»", "")
    assert (c.quote, c.quote_at) == (marked[want + 1:marked.index("»")], want)
    assert lint_hint(c.hint, c.quote) is None


def test_made_up_values_stay_conservative():
    """Numbers are compared by value, words whole and without case; short or plain values are never judged."""
    from opsd_critic.conversation import _made_up_kind

    assert _made_up_kind("order_id", "ORD-1042") == "id" and _made_up_kind("orderId", 12345) == "id"
    assert _made_up_kind("refund_amount", 5) == "amount" and _made_up_kind("to", "a@b.co") == "email"
    for key, value in [("city", "Paris"), ("time", "10am"), ("count", 250), ("number_of_people", 120), ("id", 7),
                       ("model", "gpt4"), ("date", "2024-05-01"), ("unit", "celsius"), ("flag", True)]:
        assert _made_up_kind(key, value) is None, (key, value)
