"""`datasets` as the data layer: Parquet/Arrow files, save_to_disk folders, data folders, cached hub ids."""
import json
import socket

import datasets
import pytest

from opsd.io.records import read_records, write_records
from opsd.io.trajectories import LoadSummary, TrajectoryError, load_trajectories
from tests.conftest import DATA, SAMPLE_LOGS


def _without_nulls(value):
    if isinstance(value, dict):
        return {k: _without_nulls(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_nulls(v) for v in value]
    return value


@pytest.fixture(scope="module")
def samples():
    return load_trajectories([DATA / f for f in SAMPLE_LOGS])


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Reading tables and hub caches must never open a connection."""
    def refuse(*a, **k):
        raise AssertionError("network access attempted")
    monkeypatch.setattr(socket.socket, "connect", refuse)


def test_parquet_written_by_someone_else_loads_the_same_trajectories(tmp_path, samples):
    # Arrow unifies struct fields across rows (missing keys become nulls): the loader drops those nulls
    f = tmp_path / "logs.parquet"
    datasets.Dataset.from_list([t.to_dict() for t in samples]).to_parquet(str(f))
    s = LoadSummary()
    back = load_trajectories(f, summary=s)
    assert s.rejected == 0 and [t.id for t in back] == [t.id for t in samples]
    assert [_without_nulls(t.to_dict()) for t in back] == [_without_nulls(t.to_dict()) for t in samples]


def test_xlam_as_parquet_like_the_hub_release(tmp_path):
    rows = json.loads((DATA / "sample_xlam.json").read_text())
    f = tmp_path / "train-00000-of-00001.parquet"
    datasets.Dataset.from_list(rows).to_parquet(str(f))
    assert [t.to_dict() for t in load_trajectories(f)] == [t.to_dict() for t in load_trajectories(DATA / "sample_xlam.json")]


def test_save_to_disk_folder_and_its_arrow_file(tmp_path, samples):
    folder = tmp_path / "saved"
    datasets.Dataset.from_list([t.to_dict() for t in samples]).save_to_disk(str(folder))
    from_folder = load_trajectories(folder)
    assert [t.id for t in from_folder] == [t.id for t in samples]
    (arrow,) = folder.glob("*.arrow")
    assert [t.to_dict() for t in load_trajectories(arrow)] == [t.to_dict() for t in from_folder]


def test_dataset_dict_folder_reads_every_split_and_errors_name_split_and_row(tmp_path, samples):
    rows = [t.to_dict() for t in samples]
    bad = json.loads(json.dumps(rows[0]))
    bad["id"] = "bad"
    bad["messages"][1]["role"] = "robot"
    folder = tmp_path / "dd"
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:4]),
                          "test": datasets.Dataset.from_list([rows[4], bad, rows[5]])}).save_to_disk(str(folder))
    s = LoadSummary()
    with open(tmp_path / "rej.jsonl", "w") as rej:
        ids = [t.id for t in load_trajectories(folder, rejects=rej, summary=s)]
    assert ids == [r["id"] for r in rows[:6]] and s.rejected == 1
    (r,) = [json.loads(x) for x in (tmp_path / "rej.jsonl").read_text().splitlines()]
    assert (r["file"], r["line"], r["unit"], r["path"]) == (f"{folder}[test]", 2, "row", "$.messages[1].role")
    with pytest.raises(TrajectoryError, match=r"dd\[test\]: row 2: \$.messages\[1\].role: 'robot' is not one of"):
        load_trajectories(folder)


def test_folder_of_mixed_data_files(tmp_path):
    import gzip

    (tmp_path / "logs" / "day2").mkdir(parents=True)
    (tmp_path / "logs" / "a.jsonl").write_text((DATA / "sample_openai.jsonl").read_text())
    (tmp_path / "logs" / "day2" / "b.jsonl.gz").write_bytes(gzip.compress((DATA / "sample_sharegpt.jsonl").read_bytes()))
    (tmp_path / "logs" / "c.json").write_text((DATA / "sample_xlam.json").read_text())
    (tmp_path / "logs" / "notes.txt").write_text("not data")
    s = LoadSummary()
    load_trajectories(tmp_path / "logs", summary=s)
    assert (s.per_format["openai"], s.per_format["sharegpt"], s.per_format["xlam"], s.rejected) == (8, 3, 4, 0)


def test_folder_without_data_is_a_clear_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(TrajectoryError, match=r"empty: a log file, a datasets save_to_disk folder, or a folder of data files"):
        load_trajectories(tmp_path / "empty")


def _fake_hub_cache(root, repo="acme/agent-logs"):
    owner, name = repo.split("/")
    snap = root / f"datasets--{owner}--{name}" / "snapshots" / "0123abcd"
    (snap / "data").mkdir(parents=True)
    (root / f"datasets--{owner}--{name}" / "refs").mkdir()
    (root / f"datasets--{owner}--{name}" / "refs" / "main").write_text("0123abcd")
    (snap / "data" / "train-00000.jsonl").write_text((DATA / "sample_openai.jsonl").read_text())
    (snap / "data" / "test-00000.jsonl").write_text((DATA / "sample_messages.jsonl").read_text())
    (snap / "README.md").write_text("# card")


def test_cached_hub_dataset_id_is_read_without_network(tmp_path, monkeypatch):
    _fake_hub_cache(tmp_path / "hub")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.chdir(tmp_path)
    s = LoadSummary()
    everything = load_trajectories("acme/agent-logs", summary=s)
    assert (s.per_format["openai"], s.per_format["messages"]) == (8, 2) and len(everything) == 10
    test = load_trajectories("acme/agent-logs:test")
    assert len(test) == 2 and all(t.id.startswith("acme/agent-logs:test:") for t in test)


def test_uncached_hub_id_is_a_clear_error_and_nothing_is_downloaded(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", tmp_path / "ds")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(TrajectoryError, match="not there and opsd never downloads"):
        load_trajectories("acme/not-cached")


def test_missing_local_path_is_a_file_not_found(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file or folder"):
        load_trajectories(tmp_path / "nope.jsonl")


def test_datasets_output_round_trips_exactly(tmp_path, samples):
    records = [{"key": "a", "verdict": "ok", "step": None, "score": 1, "meta": {"x": [1, 2.5, "s"], "é": None}},
               {"key": "b", "verdict": "error", "step": 2, "score": 1.5, "extra": True},
               {"key": "c", "verdict": "failed", "step": 3, "score": 2, "meta": {}}]
    assert write_records(tmp_path / "recs", records, format="datasets") == 3
    assert list(read_records(tmp_path / "recs")) == records  # None kept, ints stay ints, no added keys
    assert datasets.load_from_disk(str(tmp_path / "recs")).num_rows == 3  # a plain datasets folder
    write_records(tmp_path / "trajs", [t.to_dict() for t in samples], format="datasets")
    assert [t.to_dict() for t in load_trajectories(tmp_path / "trajs")] == [t.to_dict() for t in samples]
    write_records(tmp_path / "none", [], format="datasets")
    assert list(read_records(tmp_path / "none")) == [] and load_trajectories(tmp_path / "none") == []


def test_a_broken_table_file_is_a_reject_naming_file_and_row(tmp_path):
    good = tmp_path / "good.jsonl"
    good.write_text(json.dumps({"id": "kept", "messages": [{"role": "user", "content": "hi"}]}) + "\n")
    for name in ("broken.parquet", "broken.arrow"):
        bad = tmp_path / name
        bad.write_bytes(b"PAR1 this is not a table file")
        s = LoadSummary()
        with open(tmp_path / "rej.jsonl", "w") as rej:
            trajs = load_trajectories([bad, good], rejects=rej, summary=s)
        (r,) = [json.loads(x) for x in (tmp_path / "rej.jsonl").read_text().splitlines()]
        assert [t.id for t in trajs] == ["kept"] and (r["file"], r["line"], r["unit"]) == (str(bad), 1, "row")
        assert "a readable" in r["error"] and "reading stopped at row 1" in r["error"]
        with pytest.raises(TrajectoryError, match=f"{name}: row 1: "):
            load_trajectories(bad)
