"""The LLM critic's prompt: the user's Jinja2 template, checked before any request, and its variables.

    template, source = load_prompt("my_prompt.j2")      # PromptError names the file and line
    template.render(**prompt_variables(traj))

Log text is untrusted: every message reaches the template as a JSON string literal (`fence`), so
nothing inside it can pose as prompt structure.
"""
from __future__ import annotations

import json
import traceback
from pathlib import Path

import jinja2
import jinja2.meta

import opsd_prompts
from opsd_critic.base import REFERENCE_CATEGORIES, SCHEMA_CATEGORIES
from opsd_critic.validate import DEFAULT_MAX_HINT_TOKENS
from opsd.render import message_text
from opsd.types import Trajectory

PROMPT_VARIABLES = ("trajectory", "messages", "tools", "tools_json", "task", "ground_truth", "categories",
                    "max_hint_words")


class PromptError(ValueError):
    """The prompt template cannot be used (not UTF-8, syntax error, unknown filter, undocumented
    variable or attribute); the message names the template file and line."""


def _tojson(x, indent=None) -> str:
    return json.dumps(x, ensure_ascii=False, indent=indent)


TEMPLATE_NAME = "<critic prompt>"  # the code-object filename of the compiled template (traceback lines)


def load_prompt(path: str | None = None) -> tuple[jinja2.Template, str]:
    """(template, source) of the critic prompt; raises PromptError naming the file and line."""
    where = path or "prompts/critic/locate_error.j2"
    try:
        src = Path(path).read_bytes().decode("utf-8") if path else opsd_prompts.read("critic/locate_error.j2")
    except UnicodeDecodeError as e:
        line = Path(path).read_bytes()[:e.start].count(b"\n") + 1
        raise PromptError(f"{where}:{line}: the template is not UTF-8 text (byte {e.start}: "
                          f"{e.object[e.start:e.start + 1]!r}); save it as UTF-8") from None
    except OSError as e:
        raise PromptError(f"{where}: cannot read the template: {e.strerror or e}") from None
    env = jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True, autoescape=False)
    env.filters["tojson"] = _tojson
    try:
        ast = env.parse(src)
        unknown = sorted(jinja2.meta.find_undeclared_variables(ast) - set(PROMPT_VARIABLES))
        if unknown:
            raise PromptError(f"{where}: undefined template variable(s) {', '.join(unknown)}; "
                              f"available: {', '.join(PROMPT_VARIABLES)}")
        template = env.template_class.from_code(env, env.compile(src, filename=TEMPLATE_NAME), env.make_globals(None))
    except jinja2.TemplateSyntaxError as e:  # also an unknown filter or test (TemplateAssertionError)
        raise PromptError(f"{where}:{e.lineno}: template error: {e.message}") from None
    return template, src


def template_error(e: Exception, where: str) -> PromptError:
    """A PromptError naming the template line where rendering failed (from the traceback)."""
    line = None
    for frame, lineno in traceback.walk_tb(e.__traceback__):
        if frame.f_code.co_filename == TEMPLATE_NAME:
            line = lineno
    msg = getattr(e, "message", None) or str(e)
    return PromptError(f"{where}{f':{line}' if line else ''}: template error: {msg}; "
                       f"the variables are {', '.join(PROMPT_VARIABLES)} (see prompts/critic/locate_error.j2)")


def fence(text: str) -> str:
    """Message text as a JSON string literal: one line, quotes and newlines escaped, so nothing
    inside it can look like prompt structure (a `[4] assistant:` label) to the critic."""
    return json.dumps(text, ensure_ascii=False)


def prompt_variables(traj: Trajectory, *, max_hint_tokens: int = DEFAULT_MAX_HINT_TOKENS) -> dict:
    """The documented template variables for `traj` (see `prompts/critic/locate_error.j2`)."""
    msgs = [{"index": i, "role": str(m.get("role", "")), "text": message_text(m) if m.get("role") == "assistant"
             else str(m.get("content") or "")} for i, m in enumerate(traj.messages)]
    for m in msgs:
        m["text_json"] = fence(m["text"])
    task = traj.meta.get("task") or next((m["text"] for m in msgs if m["role"] == "user"), "")
    return {
        "trajectory": "\n".join(f"[{m['index']}] {m['role']}: {m['text_json']}" for m in msgs),
        "messages": msgs,
        "tools": traj.tools,
        "tools_json": _tojson(traj.tools, indent=1),
        "task": str(task),
        "ground_truth": traj.meta.get("ground_truth"),
        "categories": list(SCHEMA_CATEGORIES + REFERENCE_CATEGORIES),
        "max_hint_words": max(4, int(max_hint_tokens / 1.4)),
    }
