"""`opsd compare`'s gain-against-forgetting view and its pooling over seeds.

    format_tradeoff(result)                 # markdown: accuracy gain [95% CI], forgetting KL [95% CI] per method
    tradeoff_plot(result, "tradeoff.png")   # one point per method, error bars both ways
    write_seeds(out, [0, 1, 2], results)    # OUT/seeds.json, OUT/seeds.md: each seed paired, and pooled

A method is only worth its gain at the forgetting it costs ("RL's Razor", SDFT: on-policy training forgets
less than SFT at a matched gain), so each compare run plots accuracy gain over the base (held-out, paired)
against KL(base || tuned) on general questions (`opsd.eval.forgetting`): up and to the left is better.

Single-run pass@1 at this scale moves by several points between seeds, so the headline must hold over
seeds: each seed's difference is reported paired on the same held-out tasks, and the pooled row pairs
every (seed, task) as one unit (n = seeds x tasks). Tasks repeat across seeds, so the pooled interval is
narrower than a task-level one would be; a result that holds in every seed is the stronger claim.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

from opsd.eval import stats
from opsd.eval.targets import fmt_p


def _points(result: dict) -> list[tuple[str, dict, dict | None]]:
    """(method, accuracy vs base, forgetting) of every trained method of one compare result."""
    out = []
    for m, row in result["heldout"]["rows"].items():
        if row.get("status") == "trained":
            out.append((m, row["vs_base"]["official_accuracy"], row.get("forgetting")))
    return out


def format_tradeoff(result: dict) -> str:
    lines = ["## Gain against forgetting", "",
             f"Held-out accuracy gain over the base (n={result['heldout']['n']}, paired) and forgetting: per-token "
             "KL(base || method) on the base model's greedy replies to general questions asked without tools "
             "(BFCL irrelevance); lower is better.", "",
             "| method | accuracy gain, pts [95% CI] | McNemar p | forgetting, nats/token [95% CI] |", "|---|---|---|---|"]
    for m, acc, fg in _points(result):
        ci = acc["ci95"] or [0.0, 0.0]
        f = (fg or {}).get("kl_per_token") or {}
        fcell = "n/a" if f.get("mean") is None else f"{f['mean']:.4f} [{f['ci95'][0]:.4f}, {f['ci95'][1]:.4f}]"
        lines.append(f"| {m} | {100 * (acc['diff'] or 0):+.1f} [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}] | "
                     f"{fmt_p(acc['p'])} | {fcell} |")
    return "\n".join(lines)


def tradeoff_plot(result: dict, path: str | Path) -> Path | None:
    """Accuracy gain (y) against forgetting (x), one point per method with both 95% CIs; None without points."""
    pts = [(m, a, f["kl_per_token"]) for m, a, f in _points(result) if f and f["kl_per_token"].get("mean") is not None]
    if not pts:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for m, a, f in pts:
        x, y = f["mean"], 100 * (a["diff"] or 0)
        xci, yci = f["ci95"] or [x, x], [100 * v for v in (a["ci95"] or [y / 100, y / 100])]
        ax.errorbar(x, y, xerr=[[x - xci[0]], [xci[1] - x]], yerr=[[y - yci[0]], [yci[1] - y]], fmt="o", capsize=3)
        ax.annotate(m, (x, y), textcoords="offset points", xytext=(5, 5))
    ax.axhline(0, color="grey", lw=0.8)
    ax.set_xlabel("forgetting: KL(base || method), nats/token")
    ax.set_ylabel("held-out accuracy gain over the base, pts")
    ax.set_title(f"gain vs forgetting (n={result['heldout']['n']} tasks)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)


def pool_seeds(seeds: list[int], results: list[dict], *, bootstrap: int = stats.N_BOOT) -> dict:
    """Per method: each seed's paired accuracy difference, and every (seed, task) pair pooled."""
    methods = sorted({m for r in results for m, row in r["heldout"]["rows"].items() if row.get("status") == "trained"})
    out = {}
    for m in methods:
        per_seed, before, after = {}, [], []
        for s, r in zip(seeds, results):
            row = r["heldout"]["rows"].get(m) or {}
            if row.get("status") != "trained":
                per_seed[s] = {"status": row.get("status", "missing")}
                continue
            per_seed[s] = row["vs_base"]["official_accuracy"]
            before += [b for b, _ in row["accuracy_pairs"]]
            after += [a for _, a in row["accuracy_pairs"]]
        fg = [((r["heldout"]["rows"].get(m) or {}).get("forgetting") or {}).get("kl_per_token", {}).get("mean")
              for r in results]
        out[m] = {"per_seed": per_seed, "pooled": stats.paired_binary(before, after, n_boot=bootstrap) if before else None,
                  "forgetting_per_seed": fg}
    return out


def write_seeds(out: Path, seeds: list[int], results: list[dict], *, bootstrap: int = stats.N_BOOT,
                echo: Callable[[str], None] = print) -> dict:
    pooled = pool_seeds(seeds, results, bootstrap=bootstrap)
    doc = {"seeds": seeds, "pooled": pooled, "results": results}
    (out / "seeds.json").write_text(json.dumps(doc, indent=2, default=str))
    lines = [f"# opsd compare over seeds {', '.join(map(str, seeds))}", "",
             "Held-out accuracy gain over the base, pts [95% CI] (McNemar p), each seed paired on the same tasks; "
             "pooled: every (seed, task) pair as one unit.", "",
             "| method | " + " | ".join(f"seed {s}" for s in seeds) + " | pooled |", "|---" * (len(seeds) + 2) + "|"]

    def cell(o: dict | None) -> str:
        if not o or "diff" not in o:
            return (o or {}).get("status", "n/a")
        ci = o["ci95"] or [0.0, 0.0]
        return f"{100 * (o['diff'] or 0):+.1f} [{100 * ci[0]:+.1f}, {100 * ci[1]:+.1f}] (p={fmt_p(o['p'])})"

    for m, row in pooled.items():
        lines.append(f"| {m} | " + " | ".join(cell(row["per_seed"].get(s)) for s in seeds) + f" | {cell(row['pooled'])} |")
    (out / "seeds.md").write_text("\n".join(lines) + "\n")
    echo("\n".join(lines))
    return doc
