"""`opsd eval --logs`: did training down-weight the errors in your own critiqued logs? Teacher-forced, no rollouts.

    opsd eval --logs runs/mine/split/heldout.jsonl --critiques runs/mine/critiques_heldout.jsonl \
        --before smollm2-135m-instruct --after runs/mine/run/model --out runs/mine/report

Stages (artifacts under OUT):
1. read the logs (several inputs; `--rejects` skips bad records) and their critiques (`--critiques`, or
   none: the logs are critiqued with `--critic` into OUT/critiques.jsonl, resumable);
2. one grouped teacher-forced pass per model (`opsd.eval.run.teacher_forced_all`; logs that share
   their first user turn share one prompt pass): for every `error` critique that builds into a
   hinted example (`opsd.hint.build`), the mean log-prob of the error tokens under before (A), after
   (B) and the hinted before model (the OPSD teacher, a reference for how far a hint moves them), the
   argmax at the first error token; and the drift, per-token KL(A||B), on every assistant token of
   the logs outside the error spans, and on the logs the critic passed (verdict ok);
3. paired statistics (`opsd.eval.stats`, the same error tokens before and after): difference with a
   bootstrap 95% CI over errors and its p-value, the fraction lowered, argmax flips, per error
   category; drift with a CI over trajectories;
4. OUT/report.json, OUT/report.md (verdicts first) and PNG plots.

These are the logged tokens scored under both models: they say whether the errors of these logs lost
probability, not how often the after model makes them when it runs (that needs rollouts: `opsd eval
--tasks`). This module never imports `opsd_critic`: the CLI passes `critique_fn` when critiques are needed.
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch

from opsd.eval import stats
from opsd.eval.config import EvalConfig
from opsd.eval.run import REPORT_VERSION, CritiqueFn, teacher_forced_all
from opsd.eval.targets import KL_MAX, fmt_p
from opsd.io import models
from opsd.logs import read_critiques, read_logs
from opsd.redact import redacted
from opsd.split import first_user_turn
from opsd.train.diagnostics import format_summary, summarise
from opsd.types import Critique, Trajectory

TARGETS = {
    "error_tokens_fall": "the logged error tokens lose probability: mean error-span log-prob after < before "
                         f"(paired over errors, p < {stats.ALPHA})",
    "drift_outside_errors": f"per-token KL(before||after) on the erroneous logs outside the error spans < {KL_MAX} "
                            "nats (95% CI below it)",
    "drift_critic_ok": f"per-token KL(before||after) on the logs the critic passed < {KL_MAX} nats (95% CI below it)",
}


# ----------------------------------------------------------------------------- inputs
def load_inputs(cfg: EvalConfig, critique_fn: CritiqueFn | None) -> tuple[list[Trajectory], list[Critique]]:
    """The logs and one critique per log where there is one (the newest of --critiques, or fresh from critique_fn)."""
    trajs, _ = read_logs(cfg.logs, rejects=cfg.rejects, what="logs")
    if not trajs:
        raise ValueError(f"logs: no trajectory in {', '.join(cfg.logs)}")
    if cfg.critiques:
        crits = read_critiques(cfg.critiques)
    elif critique_fn is not None:
        crits = critique_fn(trajs, Path(cfg.out) / "critiques.jsonl")
    else:
        raise ValueError("critiques: give the critiques of --logs (opsd critique), or a critic to make them")
    ids = {t.id for t in trajs}
    crits = [c for c in crits if c.trajectory_id in ids]  # critique files may cover other logs (train) too
    if not crits:
        raise ValueError(f"critiques: none of {', '.join(cfg.critiques)} is about a trajectory of "
                         f"{', '.join(cfg.logs)} (ids differ: critique the held-out logs themselves)")
    latest = {c.trajectory_id: c for c in crits}  # later files and lines supersede earlier ones
    return trajs, list(latest.values())


def data_summary(cfg: EvalConfig, trajs: list[Trajectory], crits: list[Critique]) -> dict:
    verdicts = Counter(c.verdict for c in crits)
    return {"logs": cfg.logs, "critiques": cfg.critiques or [str(Path(cfg.out) / "critiques.jsonl")],
            "n_trajectories": len(trajs), "groups": len({first_user_turn(t) for t in trajs}),
            "verdicts": {"error": verdicts["error"], "ok": verdicts["ok"], "failed": verdicts["failed"],
                         "not_critiqued": len(trajs) - len(crits)},
            "error_categories": dict(Counter(c.category or "unknown" for c in crits if c.verdict == "error"))}


# ----------------------------------------------------------------------------- statistics
def error_summary(per: list[dict], cfg: EvalConfig) -> dict:
    """Paired before/after of a set of errors (`teacher_forced_all`'s per_example rows), the hinted reference."""
    greedy = [p for p in per if p["argmax_before_is_error"]]

    def mean(key: str) -> float | None:
        return sum(p[key] for p in per) / len(per) if per else None
    return {"n": len(per),
            "paired": stats.paired_mean([p["before"] for p in per], [p["after"] for p in per],
                                        n_boot=cfg.bootstrap, seed=cfg.seed),
            "hinted": mean("hinted"),
            "hint_effect": stats.paired_mean([p["before"] for p in per], [p["hinted"] for p in per],
                                             n_boot=cfg.bootstrap, seed=cfg.seed),
            "lowered": stats.rate(sum(p["after"] < p["before"] for p in per), len(per)),
            "first_token": {k: mean(f"first_{k}") for k in ("before", "after", "hinted")},
            "argmax_flips": stats.rate(sum(not p["argmax_after_is_error"] for p in greedy), len(greedy))}


def per_category(per: list[dict], cfg: EvalConfig) -> dict:
    """`error_summary` per error category (largest first), then "all"."""
    groups: dict[str, list[dict]] = {}
    for p in per:
        groups.setdefault(p.get("category") or "unknown", []).append(p)
    order = sorted(groups, key=lambda c: (-len(groups[c]), c))
    return {c: error_summary(groups[c], cfg) for c in order} | ({"all": error_summary(per, cfg)} if per else {})


def _kl_verdict(d: dict) -> tuple[str, str]:
    if not d.get("n_tokens") or d.get("mean") is None:
        return "not testable", "no token scored (n=0)"
    ci = d.get("ci95")
    ev = (f"{d['mean']:.4f} nats/token" + (f" [{ci[0]:.4f}, {ci[1]:.4f}]" if ci else "")
          + f" on {d['n_tokens']} tokens of n={d['n']} trajectories")
    if d["mean"] >= KL_MAX:
        return "not met", ev
    return ("met" if ci and ci[1] < KL_MAX else "not significant"), ev


def verdicts(report: dict) -> list[dict]:
    """[{"key", "target", "verdict", "evidence"}]: error tokens down, drift small (outside errors, critic-ok logs)."""
    allc = report["per_category"].get("all")
    if not allc:
        err = ("not testable", "no critiqued error of the logs could be built into an example "
                               f"(build counts: {report['teacher_forced'].get('build_counts')})")
    else:
        pm, low = allc["paired"], allc["lowered"]
        ci = pm["ci95"] or [float("nan")] * 2
        ev = (f"{pm['before']:.3f} -> {pm['after']:.3f} nats/token, diff {pm['diff']:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}], "
              f"p={fmt_p(pm['p'])}, lowered in {low['count']}/{low['n']}, n={pm['n']} errors; the hinted teacher "
              f"{allc['hint_effect']['diff']:+.3f}")
        if pm["direction"] == "down":
            err = ("met", ev)
        else:
            err = ("not significant" if pm["diff"] < 0 else "not met", ev)
    checks = {"error_tokens_fall": err,
              "drift_outside_errors": _kl_verdict(report["drift"]["kl_outside_error_spans"]),
              "drift_critic_ok": _kl_verdict(report["drift"]["kl_critic_ok_replies"])}
    return [{"key": k, "target": TARGETS[k], "verdict": v, "evidence": ev} for k, (v, ev) in checks.items()]


# ----------------------------------------------------------------------------- report
def _f(x, nd: int = 3, sign: bool = True) -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "n/a"
    return f"{x:+.{nd}f}" if sign else f"{x:.{nd}f}"


def verdict_lines(report: dict) -> list[str]:
    n = report["teacher_forced"].get("n_examples", 0)
    lines = [f"Verdicts (n={n} critiqued errors of {report['data']['n_trajectories']} held-out logs; the same logged "
             "tokens scored under both models):", ""]
    return lines + [f"- **{v['verdict'].upper()}**: {v['target']}. {v['evidence']}" for v in report["verdicts"]]


def category_table(cats: dict) -> list[str]:
    rows = ["| error category | n | before | after | after − before [95% CI] | p | lowered | argmax flips at the "
            "first error token | hinted − before |", "|---|---|---|---|---|---|---|---|---|"]
    for c, s in cats.items():
        pm, ci = s["paired"], s["paired"]["ci95"] or [None, None]
        fl = s["argmax_flips"]
        rows.append(f"| {c} | {s['n']} | {_f(pm['before'])} | {_f(pm['after'])} | {_f(pm['diff'])} "
                    f"[{_f(ci[0])}, {_f(ci[1])}] | {fmt_p(pm['p'])} | {s['lowered']['count']}/{s['lowered']['n']} | "
                    f"{fl['count']}/{fl['n']} | {_f(s['hint_effect']['diff'])} |")
    return rows


def drift_table(drift: dict) -> list[str]:
    rows = ["| drift | KL(before‖after) per token [95% CI over logs] | tokens | logs |", "|---|---|---|---|"]
    for key, label in (("kl_outside_error_spans", "assistant tokens of the erroneous logs, outside the error spans"),
                       ("kl_critic_ok_replies", "assistant tokens of the logs the critic passed (verdict ok)")):
        d = drift[key]
        ci = d.get("ci95") or [None, None]
        rows.append(f"| {label} | {_f(d['mean'], 4, False)} [{_f(ci[0], 4, False)}, {_f(ci[1], 4, False)}] | "
                    f"{d['n_tokens']} | {d['n']} |")
    return rows


def summary_text(report: dict) -> str:
    """The verdicts and the per-category table (printed by the CLI)."""
    return "\n".join(verdict_lines(report) + [""] + category_table(report["per_category"]) + [""]
                     + drift_table(report["drift"]))


def make_plots(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    per = report["teacher_forced"].get("per_example") or []
    if not per:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(13, max(4, 0.45 * len(report["per_category"]) + 2)))
    ax = axes[0]
    ax.hist([p["after"] - p["before"] for p in per], bins=30, alpha=0.8, label="after − before")
    ax.hist([p["hinted"] - p["before"] for p in per], bins=30, alpha=0.5, label="hinted teacher − before")
    ax.axvline(0, color="k", lw=1)
    ax.set_xlabel(f"Δ mean log-prob of the error span, nats/token (n={len(per)} logged errors)")
    ax.set_ylabel("errors")
    ax.legend()
    ax = axes[1]
    cats = list(report["per_category"].items())
    for y, (c, s) in enumerate(cats):
        pm = s["paired"]
        lo, hi = pm["ci95"] or (pm["diff"], pm["diff"])
        colour = {"down": "tab:blue", "up": "tab:red"}.get(pm["direction"], "0.5")
        ax.plot([lo, hi], [y, y], color=colour, lw=2)
        ax.plot([pm["diff"]], [y], "o", color=colour)
        ax.plot([s["hint_effect"]["diff"]], [y], "x", color="tab:green")
    ax.axvline(0, color="k", lw=1)
    ax.set_yticks(range(len(cats)), [f"{c} (n={s['n']})" for c, s in cats])
    ax.invert_yaxis()
    ax.set_xlabel("after − before, nats/token (95% CI; x: hinted teacher − before)")
    ax.set_title("per error category (blue: down, red: up, grey: p ≥ 0.05)")
    fig.tight_layout()
    fig.savefig(out / "error_span_logprob.png", dpi=110)
    plt.close(fig)
    return ["error_span_logprob.png"]


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = make_plots(report, out)
    (out / "report.json").write_text(json.dumps(report, indent=1, ensure_ascii=False, default=str))
    cfg, data, tf = report["config"], report["data"], report["teacher_forced"]
    v = data["verdicts"]
    md = ["# opsd evaluation report: critiqued logs", "", f"before: `{cfg['before']}`  ", f"after: `{cfg['after']}`  ",
          f"logs: {', '.join(f'`{p}`' for p in data['logs'])} ({data['n_trajectories']} trajectories in "
          f"{data['groups']} groups by first user turn)  ",
          f"critiques: {', '.join(f'`{p}`' for p in data['critiques'])} (error {v['error']}, ok {v['ok']}, failed "
          f"{v['failed']}, not critiqued {v['not_critiqued']}); errors built into examples: {tf.get('n_examples', 0)} "
          f"(not built: {({k: n for k, n in tf.get('build_counts', {}).items() if k != 'used'}) or 'none'})", "",
          *verdict_lines(report), "", "## Error spans, per error category", "",
          "Mean log-prob per error token (nats) of the logged error tokens; after − before is paired over errors "
          "(bootstrap 95% CI, sign-test p); argmax flips count the errors whose first token was the before "
          "model's argmax and no longer is the after model's; hinted − before is the OPSD teacher's effect (the "
          "before model with the hint), the reference for what a hint does.", "",
          *category_table(report["per_category"]), "", "## Drift", "", *drift_table(report["drift"]), ""]
    if report.get("training_diagnostics"):
        md += ["## Training diagnostics (teacher vs student at the target positions)", "",
               format_summary(report["training_diagnostics"]), ""]
    md += [f"![{p}]({p})" for p in report["plots"]]
    (out / "report.md").write_text("\n".join(md) + "\n")


# ----------------------------------------------------------------------------- orchestration
def main(cfg: EvalConfig, critique_fn: CritiqueFn | None = None, *, log=print) -> dict:
    """Evaluate before vs after on the critiqued errors of `cfg.logs`; returns the report (also written to OUT)."""
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    log(f"[eval 1/3] logs {', '.join(cfg.logs)} and their critiques")
    trajs, crits = load_inputs(cfg, critique_fn)
    report: dict = {"version": REPORT_VERSION, "kind": "logs", "config": redacted(asdict(cfg)),
                    "data": data_summary(cfg, trajs, crits)}
    log(f"[eval 2/3] teacher-forced scoring of {len(trajs)} logs under before={cfg.before} and after={cfg.after}")
    model_a, tok = models.load(cfg.before, device=cfg.device, precision=cfg.precision)
    model_b, _ = models.load(cfg.after, device=cfg.device, precision=cfg.precision)
    with torch.no_grad():
        tf, drift, _ = teacher_forced_all(model_a, model_b, tok, trajs, crits, cfg, gt_calls=False, all_turns=True,
                                          group_of=first_user_turn)
    report |= {"teacher_forced": tf, "drift": drift, "per_category": per_category(tf.get("per_example") or [], cfg)}
    if cfg.train_run and (Path(cfg.train_run) / "metrics.jsonl").exists():
        report["training_diagnostics"] = summarise(Path(cfg.train_run) / "metrics.jsonl")
    report["verdicts"] = verdicts(report)
    log("[eval 3/3] writing report")
    write_report(report, out)
    return report
