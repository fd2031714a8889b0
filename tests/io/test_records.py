import json

import pytest

from opsd.io.records import ResumableJsonl, read_jsonl


def test_resume_skips_done_and_repairs_torn_tail(tmp_path):
    p = tmp_path / "out.jsonl"
    with ResumableJsonl(p) as out:
        out.append({"key": "a", "v": 1})
        out.append({"key": "b", "v": 2})
    with p.open("a") as f:  # a writer killed mid-line
        f.write('{"key": "c", "v"')
    out = ResumableJsonl(p)
    assert out.repaired_bytes > 0 and "a" in out and "b" in out and "c" not in out
    out.append({"key": "c", "v": 3})
    with pytest.raises(ValueError, match="duplicate key"):
        out.append({"key": "a", "v": 9})
    out.close()
    assert [r["key"] for r in read_jsonl(p)] == ["a", "b", "c"]


def test_complete_but_invalid_last_line_is_cut(tmp_path):
    p = tmp_path / "out.jsonl"
    p.write_text(json.dumps({"key": "a"}) + "\n" + '{"key": "b", \n')
    out = ResumableJsonl(p)
    assert len(out) == 1
    out.close()


def test_read_jsonl_names_file_and_line(tmp_path):
    p = tmp_path / "x.jsonl"
    p.write_text('{"a": 1}\nnot json\n')
    with pytest.raises(ValueError, match=r"x.jsonl:2:"):
        list(read_jsonl(p))


def test_a_folder_where_a_file_is_expected_is_a_clear_error(tmp_path):
    from opsd.io.records import check_input_file, check_output_file

    (tmp_path / "runs").mkdir()
    with pytest.raises(ValueError, match=r"^out: .*runs is a folder; give a file path inside it \(for example .*runs/out.jsonl\)"):
        check_output_file(tmp_path / "runs", "out")
    with pytest.raises(ValueError, match=r"^file: .*runs is a folder; give a file"):
        check_input_file(tmp_path / "runs", "file")
    with pytest.raises(ValueError, match=r"^file: .*nope.jsonl does not exist"):
        check_input_file(tmp_path / "nope.jsonl", "file")
    (tmp_path / "plain").write_text("x")
    with pytest.raises(ValueError, match=r"^out: .*cannot be created: .*plain is a file, not a folder"):
        check_output_file(tmp_path / "plain" / "out.jsonl", "out")
    assert check_output_file(tmp_path / "new" / "deeper" / "out.jsonl", "out").name == "out.jsonl"
    assert check_input_file(tmp_path / "plain", "file") == tmp_path / "plain"


def test_write_records_jsonl_or_datasets(tmp_path):
    from opsd.io.records import read_records, write_records

    recs = [{"key": "a", "n": 1}, {"key": "b", "n": None, "deep": {"x": [1, {"y": "é"}]}}]
    assert write_records(tmp_path / "sub" / "out.jsonl", recs) == 2
    assert list(read_jsonl(tmp_path / "sub" / "out.jsonl")) == recs == list(read_records(tmp_path / "sub" / "out.jsonl"))
    assert write_records(tmp_path / "out_ds", recs, format="datasets") == 2
    assert list(read_records(tmp_path / "out_ds")) == recs
    with pytest.raises(ValueError, match="format: one of jsonl, datasets"):
        write_records(tmp_path / "x", recs, format="csv")
    with pytest.raises(ValueError, match="is a folder"):
        write_records(tmp_path / "out_ds", recs)


def test_read_latest_keeps_the_last_record_of_each_key_in_first_order(tmp_path):
    from opsd.io.records import read_latest

    p = tmp_path / "c.jsonl"
    p.write_text('{"key": "a", "v": 1}\n{"key": "b", "v": 2}\n{"v": 3}\n{"key": "a", "v": 4}\n{"v": 5}\n')
    assert [r["v"] for r in read_latest(p)] == [4, 2, 3, 5]
