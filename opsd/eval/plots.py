"""PNG plots of an evaluation report: paired differences with their CIs, error-span shifts, training curves."""
from __future__ import annotations

import json
from pathlib import Path

from opsd.eval.metrics import HEADLINE

_COLOURS = {"up": "tab:red", "down": "tab:blue", "no significant change": "0.5"}


def _forest(ax, items: list[tuple[str, dict]], title: str) -> None:
    """One row per paired comparison: the difference (points) and its 95% CI, coloured by the call made."""
    for y, (label, o) in enumerate(items):
        if o["diff"] is None:
            continue
        lo, hi = o["ci95"] or (o["diff"], o["diff"])
        c = _COLOURS[o["direction"]]
        ax.plot([100 * lo, 100 * hi], [y, y], color=c, lw=2)
        ax.plot([100 * o["diff"]], [y], "o", color=c)
    ax.axvline(0, color="k", lw=1)
    ax.set_yticks(range(len(items)), [label for label, _ in items])
    ax.invert_yaxis()
    ax.set_xlabel("after − before, percentage points (paired 95% CI)")
    ax.set_title(title)


def make_plots(report: dict, out: Path) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made = []
    cmp = report["comparison"]
    items = [(f"{HEADLINE[k][0]} (p={cmp['outcomes'][k]['p']:.2g})" if cmp["outcomes"][k]["p"] is not None
              else HEADLINE[k][0], cmp["outcomes"][k]) for k in HEADLINE]
    cats = [(f"{cat}: {HEADLINE[k][0]} (n={c['n']})", c["outcomes"][k]) for cat, c in cmp["per_category"].items()
            for k in ("names_undeclared_tool", "names_declared_tool", "official_accuracy")]
    fig, axes = plt.subplots(1, 2, figsize=(15, max(4, 0.35 * max(len(items), len(cats)) + 1.5)))
    _forest(axes[0], items, f"held-out outcomes, n={cmp['n']} tasks (red: up, blue: down, grey: p ≥ 0.05)")
    _forest(axes[1], cats, "per category")
    fig.tight_layout()
    fig.savefig(out / "paired_differences.png", dpi=110)
    plt.close(fig)
    made.append("paired_differences.png")
    per = (report.get("teacher_forced") or {}).get("per_example") or []
    if per:
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.hist([p["after"] - p["before"] for p in per], bins=30, alpha=0.8, label="after − before")
        ax.hist([p["hinted"] - p["before"] for p in per], bins=30, alpha=0.5, label="hinted − before")
        ax.axvline(0, color="k", lw=1)
        ax.set_xlabel(f"Δ mean log-prob of error span (n={len(per)} base-model errors)")
        ax.set_ylabel("examples")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out / "delta_logprob_hist.png", dpi=110)
        plt.close(fig)
        made.append("delta_logprob_hist.png")
    mpath = report.get("training_metrics")
    if mpath and Path(mpath).exists():
        rows = [json.loads(x) for x in Path(mpath).read_text().splitlines() if x.strip()]
        series: dict[str, list] = {}
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
