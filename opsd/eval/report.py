"""Write an evaluation report: report.json (stable keys), report.md, and PNG plots.

    from opsd.eval.report import write_report, summary_table
"""
from __future__ import annotations

import json
import math
from pathlib import Path

HEADLINE = ("unknown_tool", "no_parseable_call", "accuracy")


def _fmt(x, nd: int = 3) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return f"{x:.{nd}f}" if isinstance(x, float) else str(x)


def _pct(r: dict | None) -> str:
    if not r:
        return "0.0% [0.0, 0.0]"
    lo, hi = r["ci95"]
    return f"{100 * r['rate']:.1f}% [{100 * lo:.1f}, {100 * hi:.1f}]"


def _rate(side: dict, key: str) -> dict | None:
    if key in ("accuracy", "no_parseable_call"):
        return side[key]
    if key in side["categories"]:
        return side["categories"][key]
    from opsd.eval.run import rate

    return rate(0, side["n"])


def summary_table(report: dict) -> str:
    """Markdown before/after table of behaviour plus the teacher-forced headline numbers."""
    b, a = report["behaviour"]["before"], report["behaviour"]["after"]
    cats = sorted(set(b["categories"]) | set(a["categories"]))
    rows = ["| metric (held-out, n=%d) | before | after | relative change |" % b["n"], "|---|---|---|---|"]
    for key in ["accuracy", "no_parseable_call"] + [c for c in cats]:
        rb, ra = _rate(b, key), _rate(a, key)
        rel = f"{100 * (ra['rate'] - rb['rate']) / rb['rate']:+.0f}%" if rb["rate"] > 0 else "n/a"
        label = {"accuracy": "accuracy (fully correct call)", "no_parseable_call": "no parseable call",
                 "unknown_tool": "hallucinated function name (unknown_tool)"}.get(key, f"error: {key}")
        rows.append(f"| {label} | {_pct(rb)} | {_pct(ra)} | {rel} |")
    tf = report.get("teacher_forced", {})
    col = report.get("collateral", {})
    if tf.get("n_examples"):
        es, ft = tf["error_span_logprob"], tf["first_token_logprob"]
        rows += ["", f"| teacher-forced on {tf['n_examples']} held-out errors of the base model | before | after | hinted teacher |",
                 "|---|---|---|---|",
                 f"| mean error-span log-prob | {_fmt(es['before'])} | {_fmt(es['after'])} | {_fmt(es['hinted'])} |",
                 f"| first error token log-prob | {_fmt(ft['before'])} | {_fmt(ft['after'])} | {_fmt(ft['hinted'])} |",
                 f"| fraction of examples lowered | | {_fmt(tf['fraction_lowered'], 2)} | |",
                 f"| argmax flip rate at first error token (n={tf['argmax_flip_base']}) | | {_fmt(tf['argmax_flip_rate'], 2)} | |",
                 f"| hinted-teacher gap closed | | {_fmt(tf['gap_closed'], 2)} | |"]
    if col:
        g = col.get("gt_call_logprob", {})
        rows += ["", "| collateral | value |", "|---|---|",
                 f"| KL(before‖after) per token, outside error spans (n={col['kl_outside_error_spans']['n_tokens']}) | {_fmt(col['kl_outside_error_spans']['mean'], 4)} |",
                 f"| KL(before‖after) per token, clean trajectories (n={col['kl_clean_trajectories']['n_tokens']}) | {_fmt(col['kl_clean_trajectories']['mean'], 4)} |",
                 f"| Δ log-prob of the ground-truth call per token (n={g.get('n', 0)}) | {_fmt(g.get('delta'))} |"]
    return "\n".join(rows)


def _plots(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    b, a = report["behaviour"]["before"], report["behaviour"]["after"]
    keys = ["accuracy", "no_parseable_call"] + sorted(set(b["categories"]) | set(a["categories"]))
    fig, ax = plt.subplots(figsize=(max(6, 1.1 * len(keys)), 4))
    xs = range(len(keys))
    for off, side, label in ((-0.2, b, "before"), (0.2, a, "after")):
        rates = [_rate(side, k)["rate"] for k in keys]
        err = [[r - _rate(side, k)["ci95"][0] for k, r in zip(keys, rates)],
               [_rate(side, k)["ci95"][1] - r for k, r in zip(keys, rates)]]
        ax.bar([x + off for x in xs], rates, width=0.4, yerr=err, capsize=3, label=label)
    ax.set_xticks(list(xs), keys, rotation=30, ha="right")
    ax.set_ylabel("rate (95% CI)")
    ax.set_title("held-out behaviour before vs after")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "category_rates.png", dpi=110)
    plt.close(fig)
    made.append("category_rates.png")
    per = report.get("teacher_forced", {}).get("per_example") or []
    if per:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.hist([p["after"] - p["before"] for p in per], bins=30, alpha=0.8, label="after − before")
        ax.hist([p["hinted"] - p["before"] for p in per], bins=30, alpha=0.5, label="hinted − before")
        ax.axvline(0, color="k", lw=1)
        ax.set_xlabel("Δ mean log-prob of error span")
        ax.set_ylabel("examples")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "delta_logprob_hist.png", dpi=110)
        plt.close(fig)
        made.append("delta_logprob_hist.png")
    mpath = report.get("training_metrics")
    if mpath and Path(mpath).exists():
        rows = [json.loads(x) for x in Path(mpath).read_text().splitlines() if x.strip()]
        series = {}
        for r in rows:
            for k, v in r.items():
                if k.startswith("train/") and isinstance(v, (int, float)) and "step" in r:
                    series.setdefault(k, []).append((r["step"], v))
        keys = [k for k in ("train/loss", "train/span_kl", "train/grad_norm", "train/lr") if k in series] or list(series)[:4]
        if keys:
            fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
            for ax, k in zip(axes[0], keys):
                ax.plot(*zip(*series[k]))
                ax.set_title(k)
                ax.set_xlabel("step")
            fig.tight_layout()
            fig.savefig(out / "training_curves.png", dpi=110)
            plt.close(fig)
            made.append("training_curves.png")
    return made


def write_report(report: dict, out: str | Path) -> None:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    report["plots"] = _plots(report, out)
    (out / "report.json").write_text(json.dumps(report, indent=2, ensure_ascii=False, default=str))
    md = ["# opsd evaluation report", "", f"before: `{report['config']['before']}`  ", f"after: `{report['config']['after']}`  ",
          f"tasks: `{report['config']['tasks']}` (limit {report['config']['limit']})", "", summary_table(report), ""]
    tf = report.get("teacher_forced", {})
    if tf.get("build_counts"):
        md += [f"Teacher-forced examples built: {tf['build_counts']}", ""]
    if report.get("training_diagnostics"):
        from opsd.train.diagnostics import format_summary

        md += ["## Training diagnostics (teacher vs student at the target positions)", "",
               format_summary(report["training_diagnostics"]), ""]
    md += [f"![{p}]({p})" for p in report["plots"]]
    (out / "report.md").write_text("\n".join(md) + "\n")
