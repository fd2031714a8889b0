"""`opsd validate` / `opsd render` library side: ValidateConfig/RenderConfig, validate_main/render_main."""
import json

import pytest

from opsd.io.records import read_records
from opsd.io.trajectories import TrajectoryError, load_trajectories
from opsd.logs import (
    RenderConfig,
    ValidateConfig,
    format_validate,
    render_main,
    validate_main,
)
from tests.conftest import DATA, SAMPLE_LOGS

ALL_SAMPLES = [str(DATA / f) for f in SAMPLE_LOGS] + [str(DATA / "sample_xlam.json"), str(DATA / "sample_otel.jsonl")]


def test_validate_counts_every_format_and_writes_normalised_output(tmp_path):
    result = validate_main(ValidateConfig(inputs=ALL_SAMPLES, out=str(tmp_path / "all.jsonl")))
    s = result.summary
    assert result.ok and (s.per_format["openai"], s.per_format["messages"], s.per_format["sharegpt"],
                          s.per_format["xlam"], s.per_format["otel"]) == (8, 2, 3, 4, 2)
    assert result.written == s.valid == 19
    assert "xlam 4, otel 2; rejected 0" in format_validate(result)
    again = load_trajectories(tmp_path / "all.jsonl")
    assert [t.to_dict() for t in again] == [t.to_dict() for t in load_trajectories(ALL_SAMPLES)]
    ds = validate_main(ValidateConfig(inputs=ALL_SAMPLES, out=str(tmp_path / "all_ds"), out_format="datasets"))
    assert ds.written == 19 and list(read_records(tmp_path / "all_ds")) == [t.to_dict() for t in again]


def test_validate_with_rejects_goes_on_and_without_stops(tmp_path):
    f = tmp_path / "mixed.jsonl"
    f.write_bytes(b'{"id": "a", "messages": [{"role": "user", "content": "x"}]}\n\xff\xfe\n'
                  b'{"id": "b", "messages": [{"role": "user", "content": "y"}]}\n')
    result = validate_main(ValidateConfig(inputs=[str(f)], rejects=str(tmp_path / "rej.jsonl")))
    assert not result.ok and result.summary.valid == 2 and result.summary.rejected == 1
    assert json.loads((tmp_path / "rej.jsonl").read_text())["line"] == 2
    with pytest.raises(TrajectoryError, match=r"mixed.jsonl:2: \$: UTF-8 text"):
        validate_main(ValidateConfig(inputs=[str(f)]))


def test_a_folder_given_as_an_output_is_a_config_error(tmp_path):
    with pytest.raises(ValueError, match=r"^rejects: .* is a folder"):
        ValidateConfig(inputs=["x.jsonl"], rejects=str(tmp_path))
    with pytest.raises(ValueError, match=r"^out: .* is a folder"):
        ValidateConfig(inputs=["x.jsonl"], out=str(tmp_path))
    with pytest.raises(ValueError, match="out_format: one of jsonl, datasets"):
        ValidateConfig(inputs=["x.jsonl"], out_format="csv")
    with pytest.raises(ValueError, match="inputs: give at least one"):
        validate_main(ValidateConfig())


def test_cli_validate_counts_and_errors_without_traceback(tmp_path, capsys):
    from opsd.cli import main

    rc = main(["validate", *ALL_SAMPLES])
    assert rc == 0 and "19 valid trajectories" in capsys.readouterr().out
    (tmp_path / "empty").mkdir()
    rc = main(["validate", str(tmp_path / "empty"), "--rejects", str(tmp_path / "r.jsonl")])
    err = capsys.readouterr().err
    assert rc == 1 and "error:" in err and "found none in it" in err and "Traceback" not in err


def test_render_of_a_folder_without_data_is_a_clear_error(tmp_path):
    with pytest.raises(TrajectoryError, match="a log file, a datasets save_to_disk folder, or a folder of data files"):
        render_main(RenderConfig(input=str(tmp_path)))
    with pytest.raises(ValueError, match="no trajectory with id 'nope'"):
        render_main(RenderConfig(input=str(DATA / "sample_openai.jsonl"), id="nope"))


def test_render_warns_when_a_trajectory_is_longer_than_the_models_context(tmp_path, smol_tokenizer):
    from opsd.render import context_limit

    assert context_limit("smollm2-135m-instruct", smol_tokenizer) == 8192  # max_position_embeddings
    big = {"id": "big", "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
                                                                "function": {"name": "f", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "c", "content": " ".join(f"reading{i}={i * 7 % 1000}" for i in range(3000))}]}
    small = {"id": "small", "messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]}
    f = tmp_path / "long.jsonl"
    f.write_text(json.dumps(small) + "\n" + json.dumps(big) + "\n")
    shown = {r.id: r for r in render_main(RenderConfig(input=str(f), all=True))}
    assert shown["small"].warning is None
    assert shown["big"].n_tokens > 8192 and "longer than the model's context of 8192 positions" in shown["big"].warning
    assert render_main(RenderConfig(input=str(f), id="small", max_positions=5))[0].warning is not None
