"""Token-exact rendering on the real SmolLM2 tokenizer."""
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from opsd.io.trajectories import load_trajectories
from opsd.render import call_text, message_text, render
from opsd.types import Trajectory
from tests.conftest import DATA, SAMPLE_LOGS


@pytest.fixture(scope="module")
def samples():
    return load_trajectories([DATA / f for f in SAMPLE_LOGS])


def _whole(tok, r):
    return tok(r.text(), add_special_tokens=False)["input_ids"]


def test_every_message_span_decodes_to_its_own_text(smol_tokenizer, samples):
    for t in samples:
        r = render(t, smol_tokenizer)
        assert len(r.assistant_mask) == len(r.input_ids)
        for i, m in enumerate(t.messages):
            s, e = r.message_spans[i]
            bs, be = r.body_spans[i]
            assert s <= bs <= be <= e
            body = r.text(bs, be)
            if m["role"] == "tool":
                assert m["content"] in body
            elif m["role"] == "system" and t.tools:  # tools are appended to the system message
                assert body.startswith(m["content"]) and "<tools>" in body
            else:
                assert body == message_text(m), (t.id, i)
            assert f"<|im_start|>{'user' if m['role'] == 'tool' else m['role']}\n" in r.text(s, e)
        # spans tile the sequence after the preamble, in order, with no gaps
        ends = [r.preamble_span[1]] + [e for _, e in r.message_spans]
        assert [s for s, _ in r.message_spans] == ends[:-1] and ends[-1] == len(r.input_ids)
        # segment-wise tokenisation equals whole-text tokenisation for ChatML
        assert r.input_ids == _whole(smol_tokenizer, r)


def test_tools_rendered_hermes_style_in_system(smol_tokenizer, samples):
    t = next(x for x in samples if x.id == "weather-ok")
    r = render(t, smol_tokenizer)
    sys_text = r.text(*r.message_spans[0])
    assert "<tools>" in sys_text and '"name": "search_flights"' in sys_text
    assert sys_text.index("You are a travel assistant") < sys_text.index("<tools>")
    assert r.body_text(2) == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}\n</tool_call>'
    # no system message: tools go into an injected preamble
    t2 = next(x for x in samples if x.id == "currency-bad-json")
    r2 = render(t2, smol_tokenizer)
    assert r2.preamble_span[1] > 0 and "<tools>" in r2.text(*r2.preamble_span)


def test_assistant_mask_covers_assistant_bodies_and_end_of_turn(smol_tokenizer, samples):
    t = next(x for x in samples if x.id == "multi-turn-ok")
    r = render(t, smol_tokenizer)
    want = set()
    for i, m in enumerate(t.messages):
        if m["role"] == "assistant":
            bs, be = r.body_spans[i]
            want |= set(range(bs, be + 1))  # + <|im_end|>
    assert {k for k, v in enumerate(r.assistant_mask) if v} == want
    assert all(r.input_ids[r.body_spans[i][1]] == smol_tokenizer.convert_tokens_to_ids("<|im_end|>")
               for i, m in enumerate(t.messages) if m["role"] == "assistant")


@pytest.mark.parametrize("quote", ['{"', '":', '"}}', ' "Paris"', "Paris", ", ", "get_weather", "celsius\"}}\n</"])
def test_quote_span_exact_on_merged_punctuation_and_leading_space(smol_tokenizer, samples, quote):
    t = next(x for x in samples if x.id == "weather-ok")
    r = render(t, smol_tokenizer)
    s, e = r.quote_span(2, quote)
    text = r.text(s, e)
    assert quote in text
    # minimal: dropping either end token loses part of the quote
    assert quote not in r.text(s + 1, e) and quote not in r.text(s, e - 1)
    bs, be = r.body_spans[2]
    assert bs <= s < e <= be


@pytest.mark.parametrize("quote", ["Zürich", "ü", "°C", "€", "日本語", "🌧️ ok"])
def test_quote_span_non_ascii(smol_tokenizer, quote):
    t = Trajectory("u", [{"role": "user", "content": "x"},
                         {"role": "assistant", "content": "Il pleut à Zürich: 12 °C, 5 € — 日本語 🌧️ ok"}])
    r = render(t, smol_tokenizer)
    s, e = r.quote_span(1, quote)
    assert quote in r.text(s, e)
    assert quote not in r.text(s + 1, e) and quote not in r.text(s, e - 1)


def test_quote_span_occurrence_and_errors(smol_tokenizer):
    t = Trajectory("o", [{"role": "user", "content": "x"}, {"role": "assistant", "content": "ab ab ab"}])
    r = render(t, smol_tokenizer)
    spans = [r.quote_span(1, "ab", k) for k in range(3)]
    assert spans[0] < spans[1] < spans[2]
    with pytest.raises(ValueError, match="not found"):
        r.quote_span(1, "ab", 3)
    with pytest.raises(ValueError, match="not found"):
        r.quote_span(0, "ab")
    with pytest.raises(IndexError):
        r.quote_span(5, "ab")


def test_generated_token_ids_are_used_verbatim(smol_tokenizer):
    # a non-canonical tokenisation of "Hello world": re-encoding the text would give other ids
    ids = smol_tokenizer("Hel", add_special_tokens=False)["input_ids"] + \
        smol_tokenizer("lo world", add_special_tokens=False)["input_ids"]
    text = smol_tokenizer.decode(ids)
    assert smol_tokenizer(text, add_special_tokens=False)["input_ids"] != ids
    t = Trajectory("g", [{"role": "user", "content": "hi"}, {"role": "assistant", "content": text, "token_ids": ids}])
    r = render(t, smol_tokenizer)
    bs, be = r.body_spans[1]
    assert r.input_ids[bs:be] == ids
    s, e = r.quote_span(1, "world")
    assert "world" in r.text(s, e)


def test_invalid_json_arguments_render_verbatim():
    call = {"function": {"name": "f", "arguments": '{"a": 1'}}
    assert call_text(call) == '<tool_call>\n{"name": "f", "arguments": {"a": 1}\n</tool_call>'


def test_native_tool_template_is_used_when_supported(smol_tokenizer):
    import copy

    tok = copy.deepcopy(smol_tokenizer)
    tok.chat_template = (
        "{% if tools %}<|im_start|>system\nTOOLS:{{ tools | length }}<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}"
        "{% for c in m.tool_calls or [] %}[CALL {{ c.function.name }} {{ c.function.arguments | tojson }}]{% endfor %}"
        "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    t = Trajectory("n", [{"role": "user", "content": "weather?"},
                         {"role": "assistant", "content": "", "tool_calls": [
                             {"id": "c", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}]}],
                   tools=[{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}])
    r = render(t, tok)
    assert "TOOLS:1" in r.text() and '[CALL get_weather {"city": "Oslo"}]' in r.text()
    s, e = r.quote_span(1, "get_weather")
    assert "get_weather" in r.text(s, e)


_text = st.text(alphabet=st.characters(blacklist_categories=("Cs", "Cc", "Cn", "Co"), blacklist_characters="<>"), min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(turns=st.lists(st.tuples(_text, _text), min_size=1, max_size=3), data=st.data())
def test_property_random_messages(smol_tokenizer, turns, data):
    msgs = []
    for u, a in turns:
        msgs += [{"role": "user", "content": u}, {"role": "assistant", "content": a}]
    t = Trajectory("h", msgs)
    r = render(t, smol_tokenizer)
    for i, m in enumerate(msgs):
        assert r.body_text(i) == m["content"]
    step = data.draw(st.sampled_from([i for i in range(len(msgs)) if i % 2 == 1]))
    text = msgs[step]["content"]
    a = data.draw(st.integers(0, len(text) - 1))
    b = data.draw(st.integers(a + 1, len(text)))
    quote = text[a:b]
    s, e = r.quote_span(step, quote)
    assert quote in r.text(s, e)
    bs, be = r.body_spans[step]
    assert bs <= s < e <= be


def test_tool_call_arguments_json_roundtrip():
    c = {"function": {"name": "f", "arguments": json.dumps({"x": "é", "n": [1, 2]})}}
    inner = call_text(c)[len("<tool_call>\n"):-len("\n</tool_call>")]
    assert json.loads(inner) == {"name": "f", "arguments": {"x": "é", "n": [1, 2]}}
