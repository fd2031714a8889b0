"""BENCHMARKS.md from the results of bench/run_all.py: one section per CPU kind (machine, ISA features, the
precision `auto` picks, commands, the targets of issues 13 and 6 with met / missed, one subsection per benchmark
from bench/report_sections.py, and what limits each missed target), then the hand-written sections of the
previous file (kept verbatim).

    from bench import report
    text = report.render(facts, runs, total_s=..., quick=False, results_dir=Path("bench/results/avx2"), previous=old_md)

A run replaces only the section of its own machine's kind (bench/machine.py): the other kinds' sections
of the previous file are kept as they are, since figures from a CPU with bf16 units do not hold on one
without. Each kind's section starts with a `<!-- cpu-kind {...} -->` line that carries its facts.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from bench import machine
from bench import report_sections as sec

TARGETS = {"bf16_speedup": 1.8, "step_speed": 4.0, "step_rss": 0.5, "floor": 0.70, "rollout": 2.0, "vllm": 1.5,
           "critic": 0.70}
HAND_WRITTEN = "written by hand"  # a section of the previous BENCHMARKS.md that says this is kept verbatim
KIND_MARK = re.compile(r"^<!-- cpu-kind (\{.*\}) -->$", re.M)  # the first line under a kind section's heading
COMMON_KINDS = ("avx512_bf16", "avx2")  # the kinds this project's machines come in: named even before a run


def _yes(ok: bool | None) -> str:
    return "n/a" if ok is None else ("**met**" if ok else "**missed**")


def _get(runs: list[dict], name: str) -> dict | None:
    r = next((r for r in runs if r["name"] == name), None)
    return r["result"] if r and r["status"] == "ok" else None


def _status(runs: list[dict], name: str) -> str:
    r = next((r for r in runs if r["name"] == name), None)
    return r["status"] if r else "not run"


def _sections(previous: str | None) -> list[str]:
    return [p.rstrip() for p in re.split(r"(?m)^(?=## )", previous or "") if p.startswith("## ")]


def kind_sections(previous: str | None) -> dict[str, tuple[dict, str]]:
    """kind -> (its facts, its section's text) for the kind sections of the previous file."""
    out = {}
    for text in _sections(previous):
        m = KIND_MARK.search(text)
        if m:
            meta = json.loads(m.group(1))
            out[meta["kind"]] = (meta, text)
    return out


def kept_sections(previous: str | None) -> list[str]:
    """`## ` sections of the previous file whose text says they were written by hand (not by this script)."""
    return [t for t in _sections(previous) if HAND_WRITTEN in t and not KIND_MARK.search(t)]


def render(facts: dict, runs: list[dict], *, total_s: float, quick: bool, results_dir: Path | None = None,
           previous: str | None = None) -> str:
    """The whole file: this run's kind section (new or replacing the previous one), the other kinds' sections and
    the hand-written sections of `previous`, as they were."""
    kind = machine.kind_of_facts(facts)
    kinds = kind_sections(previous)
    meta = {"kind": kind, "date": facts["date"], "cpu": facts["cpu"], "isa": facts.get("isa"),
            "precision": machine.precision_of_facts(facts), "commit": facts.get("commit"), "quick": quick}
    kinds[kind] = (meta, "\n".join(kind_section(meta, facts, runs, total_s=total_s, quick=quick,
                                                 results_dir=results_dir)).rstrip())
    order = sorted(kinds, key=lambda k: list(machine.KINDS).index(k) if k in machine.KINDS else len(machine.KINDS))
    out = ["# Benchmarks", "",
           "Written by `bench/run_all.py` (`make bench`); rerun it instead of editing this file. Figures from a CPU "
           "with bf16 units do not hold on one without (`precision=auto` runs bf16 on the first, fp32 on the second), "
           "so there is one section per CPU kind: a run replaces only its own kind's section, and sections that say "
           "they were written by hand are kept as they are. Raw results: `bench/results/KIND/*.json`. Issues 6, 13 "
           "and 25.", ""]
    out += _index([kinds[k][0] for k in order])
    for k in order:
        out += [kinds[k][1], ""]
    for i, text in enumerate(kept_sections(previous), start=6):
        out += [re.sub(r"^## (\d+\. )?", f"## {i}. ", text, count=1), ""]
    return "\n".join(out).rstrip() + "\n"


def kind_section(meta: dict, facts: dict, runs: list[dict], *, total_s: float, quick: bool,
                 results_dir: Path | None) -> list[str]:
    step, roll, crit, num = (_get(runs, n) for n in ("step", "rollout", "critic", "numerics"))
    cur = None
    if results_dir is not None and (results_dir / "curves.json").exists():
        cur = json.loads((results_dir / "curves.json").read_text())
    out = [f"## On {machine.kind_label(meta['kind'])} CPUs (precision auto = {meta['precision']})",
           f"<!-- cpu-kind {json.dumps(meta, sort_keys=True)} -->", ""]
    if quick:
        out += ["> **QUICK RUN: smoke sizes, not a measurement.** Run `make bench` for real numbers.", ""]
    out += [f"Run of {facts['date']}" + (f", raw results in `{sec._rel(results_dir)}/`" if results_dir else "") + ".", ""]
    out += _machine(facts, runs, total_s)
    out += _targets(step, roll, crit, runs)
    out += sec.step(step, _status(runs, "step"))
    out += sec.curves(cur, results_dir or sec.RESULTS)
    out += sec.rollout(roll, _status(runs, "rollout"))
    out += sec.numerics(num, roll, _status(runs, "numerics"))
    out += sec.critic(crit, _status(runs, "critic"))
    out += _limits(step, roll, crit)
    return out


def _index(metas: list[dict]) -> list[str]:
    out = ["| CPU kind | CPU | ISA features (/proc/cpuinfo) | precision `auto` picks | last run |", "|---|---|---|---|---|"]
    for m in metas:
        out.append(f"| {machine.kind_label(m['kind'])} | {m['cpu']} | {_features(m.get('isa'))} | {m['precision']} | "
                   f"{m['date']}, commit {_short(m.get('commit'))}{' (quick run)' if m.get('quick') else ''} |")
    missing = [machine.kind_label(k) for k in COMMON_KINDS if k not in {m["kind"] for m in metas}]
    if missing:
        out += ["", "Not run on " + ", ".join(missing) + " yet."]
    return out + [""]


def _short(commit: str | None) -> str:
    head, _, dirty = (commit or "?").partition(" + ")
    return head + (" + uncommitted changes" if dirty else "")


def _features(isa: dict | None) -> str:
    if not isa:
        return "not recorded (run before issue 25; bf16 units from torch)"
    return ", ".join(f"{f} {'yes' if isa.get(f) else 'no'}" for f in machine.FEATURES)


# ---------------------------------------------------------------- sections

def _machine(facts: dict, runs: list[dict], total_s: float) -> list[str]:
    mem = f"{facts['mem_gb']:.1f} GB" if facts.get("mem_gb") else "?"
    out = ["### Machine and commands", "",
           "| | |", "|---|---|",
           f"| CPU | {facts['cpu']} ({'bf16 units: ' + facts['bf16'] if facts.get('bf16') else ''}) |",
           f"| ISA features | {_features(facts.get('isa'))} |",
           f"| precision chosen (`auto`) | {machine.precision_of_facts(facts)} |",
           f"| cores | {facts['cores']} (torch threads: {facts['torch_threads']}) |",
           f"| memory | {mem} |",
           f"| software | Python {facts['python']}, torch {facts['torch']}, transformers {facts['transformers']}, "
           f"trl {facts['trl']} |",
           f"| platform | {facts['platform']} |",
           f"| commit | {facts['commit']} |",
           f"| total wall time | {total_s / 60:.1f} min |", "",
           "Run under `/tmp/opsd-torch.lock`, so no other torch job that takes the lock ran at the same time. "
           "Processes that do not take the lock still can: every timed side records the load average and the "
           "share of the CPU that other processes used while it ran, and rounds where that share was above 10% "
           "are discarded and run again (bench/timing.py).", "",
           "```", "flock /tmp/opsd-torch.lock make bench     # pip install -e \".[bench]\"; python bench/run_all.py",
           "# which runs, in order:"]
    out += [r["command"] + f"    # {r['wall_s'] / 60:.1f} min, {r['status']}"
            + (f", load average after it (1/5/15 min): {r['loadavg']}" if r.get("loadavg") else "")
            for r in runs if r["command"]]
    out += ["```", ""]
    lines = [x for r in runs for x in (r.get("machine_lines") or ([r["machine_line"]] if r.get("machine_line") else []))]
    if lines:
        out += ["Machine-readable last lines:", "", "```"] + lines + ["```", ""]
    return out


def _targets(step, roll, crit, runs) -> list[str]:
    out = ["### Targets", "", "| target | measured | |", "|---|---|---|"]
    if step and "ratio_trajectories_per_s" in step:
        used = step["config"]["used"]
        b = step["by_precision"][used]
        r, m, f = step["ratio_trajectories_per_s"], step["ratio_peak_rss"], step["floor_share"]
        rr = ", ".join(f"{x['ratio']:.2f}×" for x in b["ratio_per_round"])
        if "bf16_speedup" in step:
            out.append(f"| opsd step in bf16 ≥ 1.8× opsd fp32 (same run, lowest round) | {step['bf16_speedup']:.2f}× | "
                       f"{_yes(step['bf16_speedup'] >= TARGETS['bf16_speedup'])} |")
        elif used != "bf16":
            out.append(f"| opsd step in bf16 ≥ 1.8× opsd fp32 | not run: `auto` picks {used} on this CPU (no bf16 units) "
                       "| n/a |")
        out.append(f"| opsd ≥ 4× the faster TRL trainer's trajectories/s at {used}, lowest round | {r:.2f}× (per round {rr}; "
                   f"vs {b['faster_trl']}) | {_yes(r >= TARGETS['step_speed'])} |")
        out.append(f"| … at ≤ 0.5× its peak RSS | {m:.2f}× | {_yes(m <= TARGETS['step_rss'])} |")
        out.append(f"| opsd ≥ 70% of the {used} FLOP floor (6N per trained + 2N per teacher token) | {f:.0%} "
                   f"(actual matmul FLOPs: {b['sides']['opsd']['floor_share_exact']:.0%}) | {_yes(f >= TARGETS['floor'])} |")
    else:
        out.append(f"| opsd step vs TRL, bf16 vs fp32, FLOP floor | step benchmark: {_status(runs, 'step')} | n/a |")
    if roll:
        c = roll["config"]
        out.append(f"| rollouts ≥ 2× naive batch-8 `generate` at the same precision ({c['precision']}, lowest round) | "
                   f"{roll['rollout_speedup']:.2f}× | {_yes(roll['rollout_speedup'] >= TARGETS['rollout'])} |")
        vllm, source = sec.vllm_reference(roll)
        if vllm:
            t = c["limit"] / max(roll["sides"]["opsd"]["runs"])
            out.append(f"| hf backend in bf16 within 1.5× of vLLM-CPU (warm) on the same prompts | {t / vllm:.2f}× "
                       f"({t:.0f} s vs {vllm:.1f} s; {source.split(':')[0]}) | {_yes(t / vllm <= TARGETS['vllm'])} |")
        else:
            out.append(f"| hf backend in bf16 within 1.5× of vLLM-CPU (warm) | not compared: {source} | n/a |")
    else:
        out.append(f"| rollouts ≥ 2× naive | rollout benchmark: {_status(runs, 'rollout')} | n/a |")
    if crit:
        out.append(f"| critic ≥ 70% of concurrency/latency at concurrency {crit['efficiency_at']} (issue 6) | "
                   f"{crit['critic_efficiency']:.0%} | {_yes(crit['critic_efficiency'] >= TARGETS['critic'])} |")
    return out + [""]


def _limits(step, roll, crit) -> list[str]:
    """What the measurements say about each missed target (numbers only; the analysis is in the hand-written section)."""
    out = ["### What limits the missed targets (from this run's numbers)", ""]
    if step and "ratio_trajectories_per_s" in step:
        used = step["config"]["used"]
        b = step["by_precision"][used]
        o = b["sides"]["opsd"]
        ph = o.get("phases") or {}
        tot = sum(v for k, v in ph.items() if k != "step") or 1.0
        if step["ratio_trajectories_per_s"] < TARGETS["step_speed"] or step["ratio_peak_rss"] > TARGETS["step_rss"]:
            f = b["sides"][b["faster_trl"]]
            out.append(f"- **Step vs TRL** ({step['ratio_trajectories_per_s']:.2f}×, RSS {step['ratio_peak_rss']:.2f}×): "
                       f"{b['faster_trl']} took {f['worst_round_step_s']:.2f} s (worst round) against opsd's "
                       f"{o['worst_round_step_s']:.2f} s; opsd's phases: " + ", ".join(
                           f"{k} {v / tot:.0%}" for k, v in ph.items() if k != "step") + ".")
        if o["floor_share"] < TARGETS["floor"]:
            out.append(f"- **FLOP floor** ({o['floor_share']:.0%}; actual matmul FLOPs {o['floor_share_exact']:.0%}): "
                       f"floor {o['floor_s']:.2f} s at {step['matmul'][used]['model_gemm_gflops']:.0f} GFLOP/s vs "
                       f"{o['worst_round_step_s']:.2f} s measured (profile in §1).")
        if step.get("bf16_speedup") and step["bf16_speedup"] < TARGETS["bf16_speedup"]:
            out.append(f"- **bf16 speed-up** ({step['bf16_speedup']:.2f}×): the bf16 GEMM rate is "
                       f"{step['matmul'][used]['model_gemm_gflops'] / step['matmul']['fp32']['model_gemm_gflops']:.2f}× "
                       "fp32's on the model's shapes; the non-GEMM part of the step does not get faster.")
    if roll and roll["rollout_speedup"] < TARGETS["rollout"]:
        d = roll["sides"]["opsd"].get("decode") or {}
        out.append(f"- **Rollout** ({roll['rollout_speedup']:.2f}×): opsd prefill {d.get('prefill_s', 0):.1f} s, decode "
                   f"{d.get('decode_s', 0):.1f} s (§3).")
    if crit and crit["critic_efficiency"] < TARGETS["critic"]:
        out.append(f"- **Critic** ({crit['critic_efficiency']:.0%}): see the client profile in §5.")
    if len(out) == 2:
        out.append("Every measured target was met.")
    return out + [""]
