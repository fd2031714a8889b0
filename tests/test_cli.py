"""The console script: subcommands, exit codes, messages."""
import json
import subprocess
import sys

from tests.conftest import DATA, ROOT, SAMPLE_LOGS


def opsd(*args, **kw):
    return subprocess.run([sys.executable, "-m", "opsd.cli", *args], capture_output=True, text=True, cwd=ROOT, **kw)


def test_help_lists_subcommands():
    out = opsd("--help").stdout
    for cmd in ("validate", "render", "rollout", "critique", "train", "eval", "demo"):
        assert cmd in out


def test_validate_counts_per_format():
    r = opsd("validate", *[str(DATA / f) for f in SAMPLE_LOGS])
    assert r.returncode == 0, r.stderr
    assert "openai 8" in r.stdout and "messages 2" in r.stdout and "sharegpt 3" in r.stdout and "rejected 0" in r.stdout


def test_validate_stops_on_first_invalid_line(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"id": "a", "messages": [{"role": "user", "content": "x"}]}\n{"id": "b", "messages": [{"role": "user"}]}\n'
                 '{"id": "c", "messages": "nope"}\n')
    r = opsd("validate", str(f))
    assert r.returncode == 1
    assert f"{f}:2: $.messages[0]: 'content' is a required property" in r.stderr


def test_validate_rejects_continue_and_count(tmp_path):
    f = tmp_path / "bad.jsonl"
    f.write_text('{"id": "a", "messages": [{"role": "user", "content": "x"}]}\n{"id": "b", "messages": [{"role": "user"}]}\n'
                 '{"id": "c", "messages": "nope"}\n{"id": "d", "messages": [{"role": "user", "content": "y"}]}\n')
    rej = tmp_path / "rej.jsonl"
    r = opsd("validate", str(f), "--rejects", str(rej))
    assert r.returncode == 1 and "2 valid" in r.stdout and "rejected 2" in r.stdout
    rows = [json.loads(x) for x in rej.read_text().splitlines()]
    assert [x["line"] for x in rows] == [2, 3] and all(x["error"] for x in rows)


def test_render_shows_boundaries():
    r = opsd("render", str(DATA / "sample_openai.jsonl"), "--id", "flights-missing-arg")
    assert r.returncode == 0, r.stderr
    assert "──── [2] assistant" in r.stdout and "<tool_call>" in r.stdout and '"passengers": 2' in r.stdout
    r = opsd("render", str(DATA / "sample_openai.jsonl"), "--id", "missing-id")
    assert r.returncode == 1 and "no trajectory with id" in r.stderr


def test_a_mistyped_command_gets_a_suggestion():
    r = opsd("critque", "--in", "x.jsonl")
    assert r.returncode == 2 and "did you mean 'critique'?" in r.stderr
    r = opsd("frobnicate")
    assert r.returncode == 2 and "did you mean" not in r.stderr


def test_rejects_in_a_missing_folder_is_created(tmp_path):
    """`--rejects out/rejects.jsonl` with no `out/` yet: the folder is made (it read like a missing input)."""
    f = tmp_path / "bad.jsonl"
    f.write_text('{"id": "a", "messages": [{"role": "user", "content": "x"}]}\n{"id": "b", "messages": "nope"}\n')
    rej = tmp_path / "out" / "deeper" / "rejects.jsonl"
    r = opsd("validate", str(f), "--rejects", str(rej))
    assert r.returncode == 1 and "No such file" not in r.stderr and "rejected 1" in r.stdout
    assert json.loads(rej.read_text())["line"] == 2


def test_an_empty_input_is_named_and_fails(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    r = opsd("validate", str(empty))
    assert r.returncode == 1 and "warning" in r.stderr and "no trajectory in" in r.stderr and str(empty) in r.stderr
    r = opsd("validate", str(empty), str(DATA / "sample_openai.jsonl"))  # one of several inputs: named, not fatal
    assert r.returncode == 0 and f"{empty} holds no trajectory" in r.stderr


def test_rollouts_show_progress_when_stderr_is_not_a_terminal(tiny_model_dir, tmp_path):
    """`opsd rollout` (and the rollouts inside `opsd eval`) draw their progress bar into a log file too, as
    critique does (it was hidden whenever stderr was not a terminal)."""
    tasks = tmp_path / "tasks.jsonl"
    tasks.write_text("".join(json.dumps({"id": f"t{i}", "messages": [{"role": "user", "content": f"hi {i}"}]}) + "\n"
                             for i in range(2)))
    r = opsd("rollout", "--tasks", str(tasks), "--model", str(tiny_model_dir), "--max-new-tokens", "2",
             "--out", str(tmp_path / "r.jsonl"), "--device", "cpu", "--prefill", "")
    assert r.returncode == 0, r.stderr
    assert "rollout: 100%" in r.stderr and "2/2" in r.stderr


def test_critique_names_an_empty_input_and_makes_the_rejects_folder(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = opsd("critique", "--in", str(empty), "--out", str(tmp_path / "c.jsonl"), "--critic.name", "schema")
    assert r.returncode == 0 and "no trajectory in" in r.stderr and str(empty) in r.stderr
    rej = tmp_path / "out" / "rejects.jsonl"
    r = opsd("critique", "--in", str(DATA / "sample_openai.jsonl"), "--out", str(tmp_path / "c2.jsonl"),
             "--critic.name", "schema", "--rejects", str(rej), "--no-progress")
    assert r.returncode == 0, r.stderr
    assert rej.exists() and rej.read_text() == ""
