"""Token-exact rendering of a trajectory with the tokenizer's chat template.

    r = render(traj, tokenizer)
    r.input_ids                 # list[int]
    r.message_spans[i]          # [start, end) tokens of message i (header + body + footer)
    r.body_spans[i]             # [start, end) tokens of message i's body (its rendered text)
    r.assistant_mask            # True on assistant body tokens and their end-of-turn token
    r.quote_span(step, quote)   # [start, end) tokens covering a verbatim substring of the step

Each message is rendered as header + body + footer, found by diffing the chat template over
message prefixes, and the pieces are tokenised separately and concatenated. This is what the
model sees at generation time (header ids, then generated ids), and it lets an assistant
message that carries its generated `token_ids` be used verbatim, with no re-tokenisation drift.

When the template has no tool support (SmolLM2's has none), tools go into the system message in
Hermes/Qwen style (`prompts/tools_system.j2`), assistant calls are written as
`<tool_call>\n{"name": ..., "arguments": ...}\n</tool_call>` and tool results as a user turn
wrapped in `<tool_response>`.

    opsd render data/sample_openai.jsonl --id weather-ok
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path

import jinja2

import opsd_prompts
from opsd.types import Trajectory


def _tojson(x) -> str:
    return json.dumps(x, ensure_ascii=False)


@lru_cache(maxsize=None)
def _tools_template() -> jinja2.Template:
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=False)
    env.filters["tojson"] = _tojson
    return env.from_string(opsd_prompts.read("tools_system.j2"))


def call_text(call: dict) -> str:
    """One tool call in Hermes form. Arguments that are not valid JSON are kept verbatim."""
    fn = call.get("function", call)
    args = fn.get("arguments", "{}")
    if isinstance(args, str):
        try:
            args_s = _tojson(json.loads(args))
        except json.JSONDecodeError:
            args_s = args
    else:
        args_s = _tojson(args)
    return f'<tool_call>\n{{"name": {_tojson(fn.get("name", ""))}, "arguments": {args_s}}}\n</tool_call>'


def message_text(msg: dict) -> str:
    """The rendered text of one message body: what critics quote and `quote_span` maps.

    An assistant message carrying generated `token_ids` is its raw `content` verbatim.
    """
    if msg.get("role") == "assistant" and "token_ids" in msg:
        return msg.get("content") or ""
    parts = [msg["content"]] if msg.get("content") else []
    parts += [call_text(c) for c in msg.get("tool_calls") or []]
    return "\n".join(parts)


def prefill_length(traj: Trajectory, step: int) -> int:
    """How many chars at the start of `message_text(traj.messages[step])` the model did not choose.

    A reply prefill (e.g. `<tool_call>\n`) is forced into the prompt before generation, so its
    tokens are not the model's decisions and no quote may start inside them. It is declared by
    the message's `"prefill"` key (a prefix of its `content`), or, for logs written before that
    key existed, by `meta["prefill"]`, which applies to the last assistant message. 0 when none
    is declared or the declared text is not a prefix of the message text.
    """
    msg = traj.messages[step]
    prefill = msg.get("prefill")
    if prefill is None and msg.get("role") == "assistant":
        last = max((i for i, m in enumerate(traj.messages) if m.get("role") == "assistant"), default=None)
        prefill = traj.meta.get("prefill") if last == step else None
    if not isinstance(prefill, str) or not prefill:
        return 0
    return len(prefill) if message_text(msg).startswith(prefill) else 0


def with_system_text(messages: list[dict], text: str) -> tuple[list[dict], int]:
    """Copies of `messages` with `text` appended to the system message (one is inserted when there is none).

    Returns the messages and how many were inserted before the others (0 or 1).
    """
    msgs = [dict(m) for m in messages]
    if msgs and msgs[0]["role"] in ("system", "developer"):
        msgs[0]["content"] = (msgs[0].get("content") or "").rstrip() + "\n\n" + text.strip()
        return msgs, 0
    return [{"role": "system", "content": text.strip()}] + msgs, 1


def eot_ids(tokenizer, model=None) -> list[int]:
    """Ids that end a turn: the chat template's end-of-turn token first (`<|im_end|>` for ChatML, else eos,
    the one that closes a reply), then the other eos ids of the tokenizer and of `model`'s generation config.

    The one definition every backend uses (hf decode loop, multi-turn, token-exact completions): a reply stops
    at any of these ids and is recorded without it. `model` is a loaded model (its `generation_config`) or a
    model name/dir (its generation_config.json, read without the weights: the completions backend has only
    the tokenizer's model); None = the tokenizer's ids only."""
    ids = []
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id:
        ids.append(im_end)
    for t in [tokenizer.eos_token_id] + generation_eos_ids(model):
        if isinstance(t, int) and t not in ids:
            ids.append(t)
    return ids


def generation_eos_ids(model) -> list[int]:
    """`eos_token_id` of a model's generation config, as a list: `model` loaded, or a name/dir (a LoRA adapter
    dir without its own generation_config.json: its base model's); [] when there is none."""
    if model is None:
        return []
    gen = getattr(model, "generation_config", None)
    if gen is None and isinstance(model, (str, Path)):
        gen = _generation_config(str(model))
    eos = getattr(gen, "eos_token_id", None)
    return [eos] if isinstance(eos, int) else [t for t in (eos or []) if isinstance(t, int)]


def _generation_config(name: str):
    """The GenerationConfig saved with model `name` (no weights loaded); None when it has none."""
    from transformers import GenerationConfig

    from opsd.io.models import resolve

    try:
        src = resolve(name)
        adapter = Path(src) / "adapter_config.json" if isinstance(src, Path) else None
        if adapter is not None and adapter.exists() and not (Path(src) / "generation_config.json").exists():
            src = resolve(json.loads(adapter.read_text())["base_model_name_or_path"])
        return GenerationConfig.from_pretrained(src, local_files_only=True)
    except (OSError, ValueError, KeyError):
        return None


def tools_system_text(tools: list[dict], system: str | None = None) -> str:
    """System message text that lists the tools in Hermes/Qwen style."""
    return _tools_template().render(tools=tools, system=system or "").rstrip("\n")


def template_supports_tools(tokenizer) -> bool:
    tpl = tokenizer.chat_template
    return isinstance(tpl, str) and "tools" in tpl


@dataclass
class Rendered:
    """Result of `render`: token ids plus per-message spans. Spans are half-open [start, end)."""

    input_ids: list[int]
    message_spans: list[tuple[int, int]]
    body_spans: list[tuple[int, int]]
    assistant_mask: list[bool]
    preamble_span: tuple[int, int]  # tokens not belonging to any message (e.g. injected system)
    tokenizer: object = field(repr=False)
    _offsets: dict = field(default_factory=dict, repr=False)

    def text(self, start: int = 0, end: int | None = None) -> str:
        return self.tokenizer.decode(self.input_ids[start:end], skip_special_tokens=False,
                                     clean_up_tokenization_spaces=False)

    def body_text(self, step: int) -> str:
        return self.text(*self.body_spans[step])

    def turn_end(self, step: int) -> int:
        """End of message `step`'s body plus, for an assistant turn, its end-of-turn token (which is trained)."""
        b1 = self.body_spans[step][1]
        return b1 + 1 if b1 < len(self.input_ids) and self.assistant_mask[b1] else b1

    def _char_offsets(self, step: int) -> list[tuple[int, int]]:
        """Per body token, the [start, end) chars of `body_text(step)` it contributes to.

        A token that ends with an incomplete UTF-8 sequence also covers the char it starts, so
        ranges of neighbouring tokens may overlap by one char (byte-level BPE splits characters).
        """
        if step not in self._offsets:
            s, e = self.body_spans[step]
            ids = self.input_ids[s:e]
            offs, prev = [], 0
            for k in range(1, len(ids) + 1):
                t = self.tokenizer.decode(ids[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False)
                pending = k < len(ids) and t.endswith("\ufffd")
                committed = max(len(t.rstrip("\ufffd")) if pending else len(t), prev)
                offs.append((prev, committed + (1 if pending else 0)))
                prev = committed
            self._offsets[step] = offs
        return self._offsets[step]

    def quote_span(self, step: int, quote: str, occurrence: int = 0, *, at: int | None = None) -> tuple[int, int]:
        """Token span of a verbatim `quote` in message `step`, widened to whole tokens.

        `at` (a `Critique.quote_at`) is the quote's char offset in the message text and wins;
        otherwise the `occurrence`-th match is used (callers check that a quote is unique).
        """
        if not 0 <= step < len(self.body_spans):
            raise IndexError(f"step {step} out of range: trajectory has {len(self.body_spans)} messages")
        if not quote:
            raise ValueError("quote must be non-empty")
        text = self.body_text(step)
        if at is not None:
            if not (0 <= at and text[at:at + len(quote)] == quote):
                raise ValueError(f"quote {quote[:60]!r} is not at char {at} of message {step}")
            a = at
        else:
            a = -1
            for _ in range(occurrence + 1):
                a = text.find(quote, a + 1)
                if a < 0:
                    raise ValueError(f"quote {quote[:60]!r} (occurrence {occurrence}) not found in message {step}")
        b = a + len(quote)
        hit = [k for k, (cs, ce) in enumerate(self._char_offsets(step))
               if cs < b and ce > a]
        base = self.body_spans[step][0]
        return base + hit[0], base + hit[-1] + 1


def to_template_messages(traj: Trajectory, tokenizer, native_tools: bool | None = None):
    """Messages as the chat template should see them, and for each one the trajectory index (None = added)."""
    native = template_supports_tools(tokenizer) if native_tools is None else native_tools
    chat, index = [], []
    msgs = traj.messages
    if traj.tools and not native and (not msgs or msgs[0]["role"] not in ("system", "developer")):
        chat.append({"role": "system", "content": tools_system_text(traj.tools)})
        index.append(None)
    for i, m in enumerate(msgs):
        role = "system" if m["role"] == "developer" else m["role"]
        if native:
            out = {k: v for k, v in m.items() if k != "token_ids"}
            if m.get("tool_calls") and "token_ids" not in m:
                out["tool_calls"] = [_native_call(c) for c in m["tool_calls"]]
            out["content"] = m.get("content") or ""
            out["role"] = role
        elif role == "system":
            out = {"role": "system", "content": tools_system_text(traj.tools, m["content"]) if traj.tools and i == 0
                   else m["content"]}
        elif role == "tool":
            out = {"role": "user", "content": f"<tool_response>\n{m['content']}\n</tool_response>"}
        else:
            out = {"role": role, "content": message_text(m)}
        chat.append(out)
        index.append(i)
    return chat, index, native


def _native_call(c: dict) -> dict:
    fn = dict(c["function"])
    try:
        fn["arguments"] = json.loads(fn["arguments"]) if isinstance(fn["arguments"], str) else fn["arguments"]
    except json.JSONDecodeError:
        pass
    return {**c, "function": fn}


def _apply(tokenizer, chat, tools, native, gen=False) -> str:
    kw = {"tools": tools} if native and tools else {}
    if not chat:
        return ""
    return tokenizer.apply_chat_template(chat, tokenize=False, add_generation_prompt=gen, **kw)


def _encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"] if text else []


def render(traj: Trajectory, tokenizer, *, add_generation_prompt: bool = False,
           native_tools: bool | None = None) -> Rendered:
    """Render `traj` to ids with exact per-message spans (see module docstring)."""
    chat, index, native = to_template_messages(traj, tokenizer, native_tools)
    tools = traj.tools if native else None
    ids: list[int] = []
    n = len(traj.messages)
    message_spans, body_spans = [(0, 0)] * n, [(0, 0)] * n
    mask: list[bool] = []
    preamble_end = 0
    special = set(tokenizer.all_special_ids)
    prev_text = ""
    for k, cm in enumerate(chat):
        full = _apply(tokenizer, chat[:k + 1], tools, native)
        if not full.startswith(prev_text):
            raise ValueError("chat template is not prefix-stable: rendering message "
                             f"{k} changed the text of earlier messages; opsd cannot map spans")
        seg = full[len(prev_text):]
        i = index[k]
        src = traj.messages[i] if i is not None else None
        body = cm["content"] if not (native and src and src.get("tool_calls")) else None
        if src is not None and src["role"] == "assistant":
            gen = _apply(tokenizer, chat[:k], tools, native, gen=True)
            header = gen[len(prev_text):] if gen.startswith(prev_text) and seg.startswith(gen[len(prev_text):]) else ""
            if body is None:  # native tool calls: the body is everything after the header
                body = seg[len(header):]
        else:
            header = None
        if body is None:
            body = ""
        if header is not None and seg[len(header):].startswith(body):
            at = len(header)
        else:
            at = seg.rfind(body) if body else len(seg)
            if at < 0:
                raise ValueError(f"chat template altered the text of message {i}; cannot locate its body")
        head_ids = _encode(tokenizer, seg[:at])
        if src is not None and src["role"] == "assistant" and "token_ids" in src:
            body_ids = list(src["token_ids"])
        else:
            body_ids = _encode(tokenizer, body)
        foot_ids = _encode(tokenizer, seg[at + len(body):])
        start = len(ids)
        ids += head_ids + body_ids + foot_ids
        is_asst = src is not None and src["role"] == "assistant"
        mask += [False] * len(head_ids) + [is_asst] * len(body_ids)
        mask += [is_asst and j == 0 and t in special for j, t in enumerate(foot_ids)]
        if i is None:
            preamble_end = len(ids)
        else:
            message_spans[i] = (start, len(ids))
            body_spans[i] = (start + len(head_ids), start + len(head_ids) + len(body_ids))
        prev_text = full
    if add_generation_prompt:
        gen = _apply(tokenizer, chat, tools, native, gen=True)
        ids += _encode(tokenizer, gen[len(prev_text):])
        mask += [False] * (len(ids) - len(mask))
    return Rendered(ids, message_spans, body_spans, mask, (0, preamble_end), tokenizer)


def prompt_ids(messages: list[dict], tools: list[dict], tokenizer, prefill: str = "") -> list[int]:
    """Ids of a prompt ending in a fresh assistant header (plus `prefill` text), for generation."""
    r = render(Trajectory(id="prompt", messages=messages, tools=tools), tokenizer, add_generation_prompt=True)
    return r.input_ids + _encode(tokenizer, prefill)


def format_rendered(r: Rendered, traj: Trajectory) -> str:
    """Human-readable dump with message boundaries, for `opsd render`."""
    out = []
    if r.preamble_span[1] > 0:
        out.append(f"──── preamble  tokens [0, {r.preamble_span[1]})\n{r.text(*r.preamble_span)}")
    for i, m in enumerate(traj.messages):
        s, e = r.message_spans[i]
        bs, be = r.body_spans[i]
        src = "  (generated token_ids)" if "token_ids" in m else ""
        out.append(f"──── [{i}] {m['role']}  tokens [{s}, {e}) body [{bs}, {be}){src}\n{r.text(s, e)}")
    out.append(f"──── total {len(r.input_ids)} tokens, {sum(r.assistant_mask)} assistant tokens")
    return "\n".join(out)


def context_limit(model, tokenizer=None) -> int | None:
    """The model's context length in tokens (`max_position_embeddings` of its config), or None if unknown."""
    try:
        from transformers import AutoConfig

        from opsd.io.models import resolve

        config = AutoConfig.from_pretrained(resolve(model), local_files_only=True)
        for key in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
            value = getattr(config, key, None)
            if isinstance(value, int) and value > 0:
                return value
    except (OSError, ValueError):
        pass
    n = getattr(tokenizer, "model_max_length", None)  # often a huge sentinel when unknown
    return n if isinstance(n, int) and 0 < n < 10**7 else None


def context_warning(traj_id: str, n_tokens: int, limit: int | None) -> str | None:
    """A warning when a rendered trajectory does not fit the model's context; None when it fits."""
    if limit is None or n_tokens <= limit:
        return None
    return (f"trajectory {traj_id!r} is {n_tokens} tokens, longer than the model's context of {limit} positions: "
            "the model cannot read it whole, so it cannot be scored or trained on as is")
