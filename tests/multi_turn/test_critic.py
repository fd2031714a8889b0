"""Reference critique of multi-turn episodes: the FIRST wrong step, whichever turn holds it."""
from __future__ import annotations

import asyncio
import json

from opsd_critic import make_critic
from opsd_critic.validate import check_critique
from opsd.io.tasks import load_tasks
from opsd.render import message_text
from opsd.types import Trajectory
from tests.multi_turn.conftest import (
    PREFILL,
    call_text,
    gt_script,
    gt_turns,
    play_script,
    script,
    task,
)


def critique(traj, name="reference"):
    c = asyncio.run(make_critic(name).critique(traj))
    assert check_critique(c, traj).verdict == c.verdict  # the runner's validation keeps it as it is
    return c


def assistant_steps(traj) -> list[int]:
    return [i for i, m in enumerate(traj.messages) if m["role"] == "assistant"]


def test_ground_truth_episodes_are_ok_for_every_base_task():
    for t in load_tasks("bfcl:multi_turn_base:all"):
        traj = play_script(t, script(gt_script(t)))
        assert critique(traj).verdict == "ok", t.id


def test_a_wrong_third_call_is_blamed_not_the_correct_ones_before_it():
    """The issue's case: ground truth for several calls; steps 1 and 2 are right, the error is in the third."""
    t = task("multi_turn_base_0")  # turn 0: cd(document), mkdir(temp), mv(final_report.pdf -> temp)
    turns = gt_script(t)
    turns[0][2] = call_text("mv", {"source": "final_report.pdf", "destination": "temp_folder"})
    traj = play_script(t, script(turns))
    c = critique(traj)
    third = assistant_steps(traj)[2]
    assert (c.verdict, c.step, c.category, c.quote) == ("error", third, "wrong_value", "temp_folder")
    assert '"temp"' in c.hint and c.quote_at == message_text(traj.messages[third]).index("temp_folder")


def test_the_error_of_a_later_turn_is_found_after_correct_turns():
    t = task("multi_turn_base_1")  # turn 1: cd(workspace), mv(log.txt -> archive)
    turns = gt_script(t)
    turns[1][1] = call_text("mv", {"source": "log.txt", "destination": "archives"})
    traj = play_script(t, script(turns))
    c = critique(traj)
    steps = assistant_steps(traj)
    assert c.step == steps[3] and c.category == "wrong_value" and c.quote == "archives"  # turn 0: 2 steps, turn 1: 2nd
    assert c.step > traj.meta["multi_turn"]["turn_starts"][1]


def test_calling_again_after_the_answer_came_back_is_an_error():
    t = task("multi_turn_base_1")
    turns = gt_script(t)
    turns[0] = turns[0] + turns[0]  # ls(a=True) twice in a row
    traj = play_script(t, script(turns), prefill=PREFILL)
    c = critique(traj)
    assert c.step == assistant_steps(traj)[1] and c.category == "repeated_call"
    assert c.quote == "<tool_call>"  # no prefill on the second reply: the model chose to call again
    # with the prefill forced on the repeated reply, the name it chose is the error
    turns2 = gt_script(t)
    turns2[1] = [turns2[0][0]] + turns2[1]  # turn 1 opens with the same ls(a=True) again
    traj2 = play_script(t, script(turns2), prefill=PREFILL)
    c2 = critique(traj2)
    assert c2.category == "repeated_call" and c2.quote == "ls" and c2.step == assistant_steps(traj2)[2]


def test_a_changing_call_repeated_is_not_a_repeat():
    t = task("multi_turn_base_0")  # turn 3 starts with cd(..): cd(..) twice would be a different place
    env_turns = gt_turns(t)
    assert env_turns[3][0] == ("cd", {"folder": ".."})
    turns = gt_script(t)
    turns[3] = [turns[3][0]] + turns[3]
    c = critique(play_script(t, script(turns)))
    assert c.category == "wrong_function" or c.category == "wrong_value"  # a wrong move, not a repeat


def test_ending_the_turn_with_calls_left_blames_the_reply_that_ended_it():
    t = task("multi_turn_base_0")
    turns = gt_script(t)
    traj = play_script(t, turns[0][:2] + ["All done, the file is moved."] + script(turns[1:]))
    c = critique(traj)
    assert c.step == assistant_steps(traj)[2] and c.category == "missing_call"
    assert c.quote == "All done, the file is moved." and "`mv`" in c.hint


def test_a_look_around_is_fine_but_blamed_when_the_needed_call_never_comes():
    t = task("multi_turn_base_1")
    turns = gt_script(t)
    pwd = call_text("pwd", {})
    ok = play_script(t, script([[pwd] + turns[0]] + turns[1:]))
    assert critique(ok).verdict == "ok"
    bad = play_script(t, script(turns[:1] + [[pwd]] + turns[2:]))
    c = critique(bad)
    assert c.step == assistant_steps(bad)[2] and c.category == "wrong_function" and c.quote == "pwd"
    assert "`cd`" in c.hint


def test_a_wrong_directory_change_is_blamed_where_it_happens():
    """cd changes only the file system's private current directory (BFCL's state check ignores it)."""
    t = task("multi_turn_base_0")  # the current directory holds document/ and archive/
    turns = gt_script(t)
    turns[0][0] = call_text("cd", {"folder": "archive"})
    traj = play_script(t, script(turns))
    c = critique(traj)
    assert c.step == assistant_steps(traj)[0] and c.category == "wrong_value" and c.quote == "archive"


def test_a_call_in_a_turn_that_needs_none_is_an_extra_call():
    t = task("multi_turn_miss_param_5")  # turn 3: a parameter is missing, the model should ask
    turns = gt_script(t)
    assert turns[3] == []
    turns[3] = [call_text("comment", {"tweet_id": 0, "comment_content": "hi"})]
    traj = play_script(t, script(turns), prefill=PREFILL)
    c = critique(traj)
    first_of_turn_3 = next(i for i in assistant_steps(traj) if i > traj.meta["multi_turn"]["turn_starts"][3])
    assert c.step == first_of_turn_3 and c.category == "extra_call" and c.quote == "comment"


def test_schema_plus_reference_reports_the_first_error_not_the_first_schema_error():
    t = task("multi_turn_base_1")
    turns = gt_script(t)
    turns[0] = [call_text("cd", {"folder": "workspace"})]  # schema-valid, wrong: the listing was asked for
    turns[2] = [call_text("search_files", {"q": "Error"})]  # not a tool: the schema critic's error, later
    traj = play_script(t, script(turns))
    c = critique(traj, "schema+reference")
    assert critique(traj, "schema").step > c.step  # what the old chain (schema first, on the whole episode) reported
    assert c.step == assistant_steps(traj)[0] and c.category == "wrong_function" and c.quote == "cd"
    r = critique(traj, "reference")
    assert (c.step, c.quote, c.hint) == (r.step, r.quote, r.hint)


def test_schema_errors_inside_a_turn_and_held_out_functions():
    t = task("multi_turn_miss_func_5")  # post_tweet is held out until turn 3
    turns = gt_script(t)
    early = call_text("post_tweet", {"content": "x"})
    traj = play_script(t, script([[early]] + turns[1:]))
    c = critique(traj)
    assert c.step == assistant_steps(traj)[0] and c.category == "unknown_tool"
    assert critique(play_script(t, script(turns))).verdict == "ok"  # at turn 3 it is declared


def test_an_episode_cut_short_with_no_wrong_step_is_failed_not_guessed():
    t = task("multi_turn_base_0")
    turns = gt_script(t)
    traj = play_script(t, turns[0][:2] + ["x"] * 10, max_steps_per_turn=2)
    assert traj.meta["finish_reason"] == "max_steps"
    c = critique(traj)
    assert c.verdict == "failed" and "max_steps" in c.error


def test_a_log_without_a_bfcl_id_is_not_replayed():
    t = task("multi_turn_base_0")
    traj = play_script(t, script(gt_script(t)))
    traj.meta["multi_turn"]["bfcl_id"] = "multi_turn_base_9999"
    c = critique(traj)
    assert c.verdict == "failed" and "not in the installed BFCL data" in c.error


WEATHER_TOOLS = [{"type": "function", "function": {"name": n, "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}}, "required": ["city"]}}}
    for n in ("get_weather", "get_forecast")]


def _log(calls: list[tuple[str, dict]], final: str | None = "It is sunny.") -> Trajectory:
    msgs = [{"role": "system", "content": "You are a weather agent."},
            {"role": "user", "content": "Weather in Paris now, and the 3-day forecast for Lyon?"}]
    for k, (name, args) in enumerate(calls):
        msgs.append({"role": "assistant", "content": None, "tool_calls": [
            {"id": f"c{k}", "type": "function", "function": {"name": name, "arguments": json.dumps(args)}}]})
        msgs.append({"role": "tool", "tool_call_id": f"c{k}", "content": '{"ok": true}'})
    if final is not None:
        msgs.append({"role": "assistant", "content": final})
    gt = [{"get_weather": {"city": ["Paris"]}}, {"get_forecast": {"city": ["Lyon"], "days": [3]}}]
    return Trajectory("weather", msgs, WEATHER_TOOLS, {"ground_truth": gt})


def test_a_log_with_several_steps_is_checked_step_by_step_against_flat_ground_truth():
    """The issue's case: a right call at message 2, the wrong one at message 4; the old critic blamed message 2."""
    c = critique(_log([("get_weather", {"city": "Paris"}), ("get_forecast", {"city": "Lyon", "days": 5})]))
    assert (c.verdict, c.step, c.category, c.quote) == ("error", 4, "wrong_value", "5")
    for name in ("reference", "schema+reference"):
        assert critique(_log([("get_weather", {"city": "Paris"}), ("get_forecast", {"city": "Lyon", "days": 3})]),
                        name).verdict == "ok"
    c = critique(_log([("get_weather", {"city": "Paris"})], final="Done."))  # stopped one call short
    assert (c.step, c.category, c.quote) == (4, "missing_call", "Done.")
    c = critique(_log([("get_forecast", {"city": "Lyon", "days": 3}), ("get_weather", {"city": "Paris"}),
                       ("get_weather", {"city": "Paris"})]))  # any order; the third call is one too many
    assert (c.step, c.category) == (6, "extra_call")
    c = critique(_log([("get_weather", {"city": "Paris"}), ("get_forecast", {"town": "Lyon"})]), "schema+reference")
    assert c.step == 4 and c.category in ("unknown_parameter", "missing_required")


def test_an_episode_that_played_no_turn_is_a_failed_critique_with_its_reason():
    """A rollout that ended before the first user turn (the tiny model's demo found one): a record, not a crash."""
    t = task("multi_turn_base_0")
    traj = play_script(t, script(gt_script(t)))
    first_user = next(i for i, m in enumerate(traj.messages) if m["role"] == "user")
    meta = {**traj.meta, "finish_reason": "error", "multi_turn": {**traj.meta["multi_turn"], "turn_starts": []}}
    c = critique(Trajectory(traj.id, traj.messages[:first_user], traj.tools, meta))
    assert c.verdict == "failed" and "the episode ended (error) after 0 of" in c.error
