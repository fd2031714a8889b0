"""BENCHMARKS.md keeps one section per CPU kind (issue 25): the ISA read from /proc/cpuinfo, the kind a run is filed
under, a run replacing only its own kind's section, the step benchmark's precisions, and run_all's JSON. No torch
work: the sections are rendered from the saved results of bench/results/avx512_bf16."""
from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest

from bench import machine, report, run_all
from bench.step import precisions_for

ROOT = Path(__file__).resolve().parents[1]
SAVED = ROOT / "bench" / "results" / "avx512_bf16"
CPUINFO = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 7B13
flags\t\t: fpu vme sse sse2 avx avx2 fma bmi2{extra}
processor\t: 1
model name\t: AMD EPYC 7B13
flags\t\t: fpu avx2 avx512f avx512_bf16 amx_bf16
"""


def _saved_runs() -> list[dict]:
    runs = json.loads((SAVED / "machine.json").read_text())["runs"]
    return [dict(r, result=json.loads((SAVED / f"{r['name']}.json").read_text())) for r in runs]


def _facts(kind: str, precision: str, date: str) -> dict:
    facts = json.loads((SAVED / "machine.json").read_text())["facts"]
    isa = {"avx2": True, "avx512f": kind != "avx2", "avx512_bf16": kind == "avx512_bf16", "amx_bf16": False}
    return facts | {"kind": kind, "isa": isa, "precision": precision, "date": date, "cpu": f"EPYC ({kind})"}


def _fp32_only(runs: list[dict]) -> list[dict]:
    """The saved runs as a CPU without bf16 units would give them: the step at fp32 only, rollouts at fp32."""
    runs = copy.deepcopy(runs)
    for r in runs:
        res = r["result"]
        if r["name"] == "step":
            res["by_precision"].pop("bf16")
            res["config"] |= {"precisions": ["fp32"], "used": "fp32"}
            for k in ("bf16_speedup", "bf16_speedup_per_round", "opsd_pre"):
                res.pop(k, None)
            res |= {k: res["by_precision"]["fp32"][k] for k in ("ratio_trajectories_per_s", "ratio_peak_rss", "floor_share")}
        if r["name"] == "rollout":
            res["config"]["precision"] = "fp32"
            for k in ("fp32", "numerics"):
                res.pop(k)
    return runs


@pytest.mark.parametrize("extra, kind", [("", "avx2"), (" avx512f", "avx512f"), (" avx512f avx512_bf16", "avx512_bf16"),
                                         (" avx512f avx512_bf16 amx_bf16", "amx_bf16")])
def test_the_kind_comes_from_the_first_cpus_flags(extra, kind):
    isa = machine.cpu_isa(CPUINFO.format(extra=extra))
    assert isa["model_name"] == "AMD EPYC 7B13" and isa["avx2"]
    assert machine.cpu_kind(isa) == kind  # the second CPU's flags (amx_bf16 ...) are not read
    assert isa["avx512_bf16"] == (kind in ("avx512_bf16", "amx_bf16"))


def test_no_cpuinfo_is_another_kind_and_old_facts_get_their_kind_from_torchs_bf16_check():
    assert machine.cpu_kind(machine.cpu_isa("")) == machine.OTHER_KIND
    old = json.loads((SAVED / "machine.json").read_text())["facts"]  # recorded before the ISA was
    assert "kind" not in old and machine.kind_of_facts(old) == "avx512_bf16"
    assert machine.precision_of_facts(old) == "bf16" and machine.precision_of_facts({"bf16": "none"}) == "fp32"


def test_step_precisions_auto_is_what_the_machine_uses():
    assert precisions_for("auto", "bf16") == ["fp32", "bf16"]  # fp32 beside bf16: the bf16 speed-up
    assert precisions_for("auto", "fp32") == ["fp32"]  # no bf16 units: bf16 would be emulated, nobody trains at it
    assert precisions_for("bf16, fp32", "fp32") == ["bf16", "fp32"]


def test_a_run_on_another_kind_adds_its_section_and_keeps_the_others(tmp_path):
    hand = "## 9. Numerics (issue 13, written by hand)\n\nKept as it is.\n"
    runs = _saved_runs()
    first = report.render(_facts("avx512_bf16", "bf16", "2026-11-24 08:22 UTC"), runs, total_s=600, quick=False,
                          results_dir=SAVED, previous="# Benchmarks\n\n## Machine and commands\nold format\n\n" + hand)
    assert "old format" not in first and "## 6. Numerics (issue 13, written by hand)\n\nKept as it is." in first
    assert "Not run on AVX2 only (no AVX-512, no bf16 units) yet." in first
    bf16_kind = report.kind_sections(first)["avx512_bf16"][1]
    assert "opsd step in bf16 ≥ 1.8× opsd fp32 (same run, lowest round) | 2.13×" in bf16_kind
    assert "precision chosen (`auto`) | bf16" in bf16_kind and "avx512_bf16 yes" in bf16_kind

    second = report.render(_facts("avx2", "fp32", "2026-12-07 14:00 UTC"), _fp32_only(runs), total_s=300, quick=False,
                           results_dir=tmp_path, previous=first)
    kinds = report.kind_sections(second)
    assert list(kinds) == ["avx512_bf16", "avx2"]
    assert kinds["avx512_bf16"][1] == bf16_kind  # the other kind's section, verbatim
    avx2 = kinds["avx2"][1]
    assert avx2.startswith("## On AVX2 only (no AVX-512, no bf16 units) CPUs (precision auto = fp32)")
    assert "avx512_bf16 no" in avx2 and "precision chosen (`auto`) | fp32" in avx2
    assert "One distillation step: opsd vs TRL's trainers, fp32 (" in avx2 and "#### bf16" not in avx2
    assert "not run: `auto` picks fp32 on this CPU (no bf16 units)" in avx2
    assert "vLLM-CPU was measured at bf16 only" in avx2  # no cross-machine vLLM comparison
    assert "Not run on" not in second and second.count("Kept as it is.") == 1

    # the same kind again: its section is replaced, the other kind's kept
    third = report.render(_facts("avx2", "fp32", "2026-12-08 09:00 UTC"), [], total_s=1, quick=True,
                          results_dir=tmp_path, previous=second)
    kinds3 = report.kind_sections(third)
    assert kinds3["avx512_bf16"][1] == bf16_kind and "2026-12-07 14:00" not in third
    assert "QUICK RUN" in kinds3["avx2"][1] and kinds3["avx2"][0]["quick"]
    assert third.count("## On AVX2 only") == 1


def test_run_all_records_the_isa_and_skips_bf16_numerics_without_bf16_units(tmp_path, monkeypatch):
    facts = _facts("avx2", "fp32", "2026-12-07 14:00 UTC")
    ran = []

    def fake_run_one(name, extra, out_json, timeout, quick):
        ran.append(name)
        return {"name": name, "command": f"python bench/{name}.py", "status": "failed (rc 1)", "wall_s": 1.0,
                "result": None, "loadavg": "0.1", "machine_line": "", "machine_lines": [], "tail": ""}

    monkeypatch.setattr(run_all.machine, "machine_facts", lambda: facts)
    monkeypatch.setattr(run_all, "run_one", fake_run_one)
    monkeypatch.setattr(run_all, "BENCH", tmp_path)
    out = tmp_path / "BENCH.md"
    out.write_text((ROOT / "BENCHMARKS.md").read_text())
    assert run_all.main(["--out", str(out)]) == 1
    assert ran == ["critic", "rollout", "step"]  # numerics is bf16 vs fp32: not run where auto is fp32
    saved = json.loads((tmp_path / "results" / "avx2" / "machine.json").read_text())
    assert saved["facts"]["isa"] == facts["isa"] and saved["facts"]["precision"] == "fp32"
    assert next(r for r in saved["runs"] if r["name"] == "numerics")["status"].startswith("skipped: precision auto is fp32")
    kinds = report.kind_sections(out.read_text())
    assert set(kinds) >= {"avx2", "avx512_bf16"} and kinds["avx2"][0]["isa"] == facts["isa"]
    assert kinds["avx512_bf16"][1] in (ROOT / "BENCHMARKS.md").read_text()
