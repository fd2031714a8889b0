"""Hints on a middle step of a multi-turn episode: right above that step; only its error span is trained."""
from __future__ import annotations

import asyncio

from opsd_critic import make_critic
from opsd.hint.build import build_example, hint_message_text
from opsd.render import render
from opsd.rollout.multi_turn import EpisodeLimits, Reply, play
from opsd.types import Trajectory
from tests.multi_turn.conftest import PREFILL, call_text, gt_script, task


def test_hint_goes_right_above_a_middle_step_and_only_its_span_is_trained(smol_tokenizer):
    tok = smol_tokenizer
    t = task("multi_turn_base_1")
    turns = gt_script(t)
    turns[1][1] = call_text("mv", {"source": "log.txt", "destination": "archives"})  # turn 2 of 4, its 2nd call
    replies = iter([r for turn in turns for r in turn + ["Done."]])

    def reply(req):  # real token ids, as a rollout records them
        text = next(replies)
        text = text if not req.prefill or text.startswith(req.prefill) else req.prefill + text
        return Reply(text, tok(text, add_special_tokens=False)["input_ids"], "stop")

    msgs, extra = play(t, reply, EpisodeLimits(), prefill=PREFILL)
    traj = Trajectory("mt", msgs, t.tools, {**t.meta, **extra, "multi_turn": {**t.meta["multi_turn"], **extra["multi_turn"]}})
    c = asyncio.run(make_critic("reference").critique(traj))
    assert c.verdict == "error" and c.quote == "archives"
    step = c.step
    replies_before = sum(1 for m in msgs[:step] if m["role"] == "assistant")
    assert replies_before == 3 and step < len(msgs) - 4  # a middle step: earlier turns before it, more turns after

    ex = build_example(traj, c, tok)
    full = render(traj, tok)
    ms, _ = full.message_spans[step]
    b0, b1 = full.body_spans[step]
    s0, s1 = ex.student_span
    # student: the whole conversation up to the error (earlier turns and tool results are context), cut after it
    assert ex.student_ids == full.input_ids[:s1]
    assert b0 <= s0 < s1 <= b1 and "archives" in tok.decode(ex.student_ids[s0:s1])
    assert len(tok.decode(ex.student_ids[s0:s1])) < len("archives") + 4  # the quote's tokens, not the step
    # teacher: identical up to the step, then the hint as a user turn, then the same step tokens
    t0, t1 = ex.teacher_span
    n_hint = t0 - s0
    assert ex.teacher_ids[:ms] == full.input_ids[:ms]
    assert tok.decode(ex.teacher_ids[ms:ms + n_hint]) == f"<|im_start|>user\n{hint_message_text(c.hint)}<|im_end|>\n"
    assert ex.teacher_ids[ms + n_hint:] == full.input_ids[ms:s1]
    assert ex.teacher_ids[t0:t1] == ex.student_ids[s0:s1]
