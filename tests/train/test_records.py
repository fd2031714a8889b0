"""TrainRecord: the typed record between the data sources and the loop; its JSON form is examples.jsonl."""
from __future__ import annotations

import pytest

from opsd.train.records import Prompt, TeacherTopK, TrainRecord


def test_round_trip_and_checks():
    topk = TeacherTopK([[5, 6], [7, 8]], [[-0.1, -2.5], [-0.2, -1.9]], [-3.0, -2.8], [-0.1, -0.2])
    rec = TrainRecord("t1", [1, 2, 5, 7], (2, 4), [1, 9, 9, 2, 5, 7], (4, 6), {"category": "x"},
                      prompt=Prompt([{"role": "user", "content": "hi"}]), scores={"hint_effect": -0.5},
                      teacher_topk=topk, advantage=0.25)
    assert TrainRecord.from_dict(rec.to_dict()) == rec
    assert rec.prefixes() == ([1, 2], [1, 9, 9, 2])
    new = rec.with_reply([11, 12, 13], prefill=[4])
    assert new.student_ids == [1, 2, 4, 11, 12, 13] and new.student_span == (3, 6) and new.teacher_span == (5, 8)
    assert new.teacher_topk is None and new.advantage is None and new.scores == {}  # they belonged to the old target
    with pytest.raises(ValueError, match="same tokens"):
        TrainRecord("bad", [1, 2, 3], (1, 3), [1, 2, 4], (1, 3))
    with pytest.raises(ValueError, match="equal length"):
        TrainRecord("bad", [1, 2, 3], (1, 3), [1, 2, 3], (2, 3))
    with pytest.raises(ValueError, match="top-k rows"):
        TrainRecord("bad", [1, 2, 3], (1, 3), [1, 2, 3], (1, 3), teacher_topk=TeacherTopK([[1]], [[0.0]], None, None))


def test_reads_examples_written_before_the_tail_was_stored():
    old = {"student_ids": [1, 2, 3], "student_span": [1, 3], "teacher_ids": [1, 2, 3], "teacher_span": [1, 3],
           "meta": {"trajectory_id": "w"}, "hint_effect": -0.2, "teacher_topk_ids": [[2], [3]],
           "teacher_topk_logprobs": [[-0.1], [-0.2]]}
    rec = TrainRecord.from_dict(old)
    assert rec.id == "w" and rec.scores == {"hint_effect": -0.2} and rec.teacher_topk.tail_logprobs is None
