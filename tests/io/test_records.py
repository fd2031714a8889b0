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
