"""The per-benchmark sections of BENCHMARKS.md (bench/report.py assembles them into one CPU kind's section): step,
cost curves, rollout, numerics, critic. Each takes the benchmark's JSON result (None when it did not run) and
returns markdown lines, headed `### N.` (they sit under the kind's `## ` heading)."""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results"

NAMES = {"opsd": "opsd, teacher=self (hinted)", "opsd_pre": "opsd, teacher=initial, precomputed top-k targets",
         "gkd": "TRL `GKDTrainer` (β=0.5, λ=0, 2 copies)", "distill": "TRL `DistillationTrainer` (chunked JSD, β=0.5)"}


def _rel(path: Path) -> str:
    """`path` as a link from BENCHMARKS.md (the repository root); as given when it lies elsewhere."""
    try:
        return Path(path).resolve().relative_to(ROOT).as_posix()
    except ValueError:
        return str(path)


def _load(meta: dict | None) -> str:
    if not meta:
        return "?"
    others = meta.get("others_cpu")
    flag = " **loaded**" if meta.get("loaded") else ""
    return f"{' '.join(f'{x:.2f}' for x in meta['loadavg'])}; others {others:.0%}{flag}" if others is not None \
        else " ".join(f"{x:.2f}" for x in meta["loadavg"])


def step(step: dict | None, status: str) -> list[str]:
    if not step:
        return ["### 1. One distillation step: opsd vs TRL's trainers (`bench/step.py`)", "", f"Not measured: {status}.", ""]
    c = step["config"]
    prs = c.get("precisions") or list(step["by_precision"])
    out = [f"### 1. One distillation step: opsd vs TRL's trainers, {' and '.join(prs)} (`bench/step.py`)", ""]
    out += [f"SmolLM2-135M on CPU; batch {c['batch']} trajectories of {c['seq_len']} tokens, each ending in a "
            f"{c['span']}-token error span; the opsd teacher reads the same trajectory with a {c['hint']}-token hint "
            f"turn above the erroneous step (TRL's teachers cannot: they read the student's ids). AdamW lr {c['lr']}, "
            "grad clip 1.0, no gradient checkpointing on any side; bf16 = autocast with fp32 master weights on every "
            f"side. Each side runs in its own process; {c['rounds']} rounds, every side at every precision in each "
            f"round (alternated); {c['warmup']} warm-up step dropped, then {c['steps']} timed steps per opsd process and "
            f"{c['trl_steps']} per TRL process. A side's step time in a round is the median of its timed steps; "
            "**per round, opsd is compared with the faster TRL trainer of that round, and the headline is the lowest "
            f"round**, at the precision opsd uses here ({c['used']}). Rounds in which other processes used more than "
            "10% of the CPU are discarded and run again (at most 3 times); `others` is the share of all cores "
            "that other processes used during a side's run.", ""]
    for pr, block in step["by_precision"].items():
        mm = step["matmul"][pr]
        out += [f"#### {pr}", "",
                "| side | step per round (s) | worst round (s) | trajectories/s (worst) | peak RSS (GB) | RSS after load "
                "(GB) | FLOP-floor share: 6N/2N | matmul FLOPs |", "|---|---|---|---|---|---|---|---|"]
        for s, v in block["sides"].items():
            out.append(f"| {NAMES.get(s, s)} | {', '.join(f'{x:.2f}' for x in v['step_s_per_round'])} | "
                       f"{v['worst_round_step_s']:.2f} | {v['trajectories_per_s']:.3f} | {v['peak_rss_gb']:.2f} | "
                       f"{v['rss_after_load_gb']:.2f} | {v['floor_share']:.0%} | {v['floor_share_exact']:.0%} |")
        out.append("")
        if "ratio_per_round" in block:
            loads = block["sides"]["opsd"]["round_meta"]
            out += ["| round | opsd / faster TRL trainer (trajectories/s) | load average after opsd (1/5/15 min); others' CPU |",
                    "|---|---|---|"]
            out += [f"| {i + 1} | {x['ratio']:.2f}× (vs {x['vs']}) | {_load(m)} |"
                    for i, (x, m) in enumerate(zip(block["ratio_per_round"], loads))]
            f = block["faster_trl"]
            out += ["", f"Lowest round: **{block['ratio_trajectories_per_s']:.2f}×** trajectories/s; peak RSS opsd / "
                    f"{f} = **{block['ratio_peak_rss']:.2f}×**. FLOP floor at {pr}: the model's GEMM shapes run at "
                    f"{mm['model_gemm_gflops']:.0f} GFLOP/s (`torch.mm`, {mm['threads']} threads, same run); lm_head at "
                    f"the span rows {mm['lm_head_span_gflops']:.0f}, on every row {mm['lm_head_full_gflops']:.0f}, 1024³ "
                    f"{mm['square_1024_gflops']:.0f} GFLOP/s.", ""]
        ph = block["sides"].get("opsd", {}).get("phases")
        if ph:
            out += ["opsd step phases (first round, median, s): " + ", ".join(f"{k} {v:.2f}" for k, v in ph.items()) + ".", ""]
    if "bf16_speedup_per_round" in step:
        out += ["**opsd bf16 vs fp32** (same rounds): " + ", ".join(f"{x:.2f}×" for x in step["bf16_speedup_per_round"])
                + f"; lowest **{step['bf16_speedup']:.2f}×**.", ""]
    if step.get("opsd_pre"):
        p = step["opsd_pre"]
        out += [f"opsd with precomputed targets ({c['used']}, one run): step {p['worst_round_step_s']:.2f} s, peak RSS "
                f"{p['peak_rss_gb']:.2f} GB; its one-off precompute pass took {p['precompute_s'] or 0:.1f} s.", ""]
    o = step["by_precision"].get(c["used"], {}).get("sides", {}).get("opsd")
    if o:
        N = step["n_params"]
        out += [f"FLOP count (issue 6): 6N per trained token + 2N per teacher-forward token, N = {N / 1e6:.1f}M; trained "
                f"tokens = every student token ({o['student_tokens']}, the span's gradient flows through the whole "
                f"prefix), teacher tokens = the tokens the teacher forward runs ({o['teacher_tokens']}: opsd's "
                "teacher=self pass starts from the student's keys/values of the prompt above the hint, so only the "
                "hint and the reply run; the whole hinted sequences would be "
                f"{o.get('hinted_tokens', o['teacher_tokens'])}, and counting them would raise opsd's floor share). "
                "The 'matmul FLOPs' column "
                "counts what is actually needed (no input-embedding matmul, causal attention, lm_head only where "
                "applied); GKD applies lm_head on every token of both models.", ""]
    trl = {s: v["settings"] for b in step["by_precision"].values() for s, v in b["sides"].items() if v.get("settings")}
    for s, st in trl.items():
        out.append(f"- {NAMES.get(s, s)} as constructed (read back from the trainer, last precision): `{json.dumps(st)}`")
    if trl:
        out += ["- `DistillationTrainer` is on-policy only (it generates completions from prompts every step). Here "
                "its `_tokenize_prompts` / `_generate_single_turn` return the given trajectory (prompt = the ids "
                "before the span, completion = the span), so it trains on the same tokens as the others; everything "
                "else in its step is TRL's code. Timed interval for TRL: `on_step_begin` → `on_step_end`.", ""]
    prof = o.get("profile") if o else None
    if prof:
        out += [f"torch.profiler, one extra opsd step at {c['used']}, top ops by self CPU time:", "", "```",
                prof.rstrip(), "```", ""]
    if step.get("discarded_rounds"):
        out += [f"Discarded rounds (another process used the CPU): {len(step['discarded_rounds'])}.", ""]
    return out


def curves(cur: dict | None, results_dir: Path = RESULTS) -> list[str]:
    out = ["### 2. Cost curves: step time and peak RSS as the work grows (`bench/curves.py`)", ""]
    if not cur or not cur.get("axes"):
        return out + ["Not measured in this run (`python bench/curves.py --axis seq|vocab|span`).", ""]
    b = cur["base"]
    n = cur.get("steps", 1)
    out += [f"One training step at {cur['precision']} on every side (bf16 = autocast with fp32 master weights), batch "
            f"{b['batch']}; each side at each point in its own process (1 warm-up step, then "
            f"{'the median of ' + str(n) + ' timed steps' if n > 1 else 'one timed step'}), so peak RSS is that point's "
            f"own (`ru_maxrss` of the process: model, optimizer state, activations). Base point {b['seq_len']} tokens, "
            f"span {b['span']}, vocabulary {b['vocab']}. The vocabulary axis uses random-initialised models of "
            f"SmolLM2-135M's shape (only the tied embedding/lm_head grows) at {cur.get('vocab_seq_len', b['seq_len'])} "
            "tokens. A GKDTrainer point whose full-vocabulary logits are predicted not to fit in memory is skipped.", ""]
    runs = cur.get("runs") or {}
    if runs:
        out += ["Run: " + "; ".join(f"{k} {v['processes']} processes, {v['wall_s'] / 60:.1f} min wall, "
                                    f"{v['child_cpu_s'] / 60:.1f} min CPU ({v['date']})"
                                    + (f", {v['loaded_points']} with others > 10% of the CPU" if v.get("loaded_points") else "")
                                    for k, v in runs.items()) + ".", ""]
    if cur.get("quick"):
        out += ["> QUICK RUN: smoke sizes, not a measurement.", ""]
    for axis, rows in cur["axes"].items():
        out += [f"![{axis}]({_rel(results_dir)}/curves_{axis}.png)", "",
                f"| {axis} | " + " | ".join(f"{NAMES[s].split(' (')[0]} step (s) / peak RSS (GB)" for s in ("opsd", "distill", "gkd"))
                + " |", "|---|---|---|---|"]
        for r in rows:
            cells = []
            for s in ("opsd", "distill", "gkd"):
                v = r["sides"].get(s, {})
                cells.append(f"{v['step_s']:.2f} / {v['peak_rss_gb']:.2f}" if "step_s" in v
                             else v.get("skipped") or ("failed" if "error" in v else "–"))
            out.append(f"| {r['x']} | " + " | ".join(cells) + " |")
        out.append("")
        out += _slopes(axis, (cur.get("shape") or {}).get(axis, {}))
    return out


def _slopes(axis: str, shape: dict) -> list[str]:
    """What each curve shows (bench/curves.py `shape`): growth from the first to the last point, per unit of the
    axis, the middle points' distance from a straight line; on the vocabulary axis, growth beyond the model state."""
    lines = []
    u = {"seq": "1024 tokens", "span": "128 span tokens", "vocab": "10k vocabulary entries"}[axis]
    for s, d in shape.items():
        (x0, x1), (t0, t1), (m0, m1) = d["x"], d["step_s"], d["peak_rss_gb"]
        off = f"; middle points within {d['rss_off_line_gb']:.2f} GB of a straight line" if d.get("rss_off_line_gb") is not None else ""
        line = (f"{NAMES[s].split(' (')[0]}: {x0} → {x1}: step {t0:.2f} → {t1:.2f} s ({d['step_ratio']:.1f}×, "
                f"{d['step_s_per_unit']:+.2f} s per {u}), peak RSS {m0:.2f} → {m1:.2f} GB ({d['rss_growth_gb']:+.2f} GB, "
                f"{d['rss_gb_per_unit']:+.3f} GB per {u}{off})")
        if "model_state_growth_gb" in d:
            line += (f"; the larger model's own state (fp32 weights, gradients, AdamW moments"
                     f"{', fp32 teacher copy' if s != 'opsd' else ''}) accounts for {d['model_state_growth_gb']:.2f} GB, "
                     f"leaving **{d['rss_growth_beyond_state_gb']:+.2f} GB** beyond it")
        lines.append(line)
    out = (["- " + x for x in lines] + [""]) if lines else []
    o, g = shape.get("opsd"), shape.get("gkd")
    if axis == "vocab" and o and "rss_growth_beyond_state_gb" in o:
        if not g:
            verdict = "cannot tell: GKDTrainer was measured at fewer than two vocabulary sizes"
        else:
            flat = o["rss_growth_beyond_state_gb"] <= 0.2 * max(g["rss_growth_beyond_state_gb"], 1e-9)
            linear = g["rss_off_line_share"] is None or g["rss_off_line_share"] <= 0.2
            verdict = ("**holds**" if flat and linear else "**does not hold**") + (
                f": beyond the model state, opsd's peak RSS grows {o['rss_growth_beyond_state_gb']:+.2f} GB from "
                f"{o['x'][0]} to {o['x'][1]} entries, GKDTrainer's {g['rss_growth_beyond_state_gb']:+.2f} GB "
                f"({g['rss_gb_per_unit']:.3f} GB per 10k entries in all"
                + (f", middle point {g['rss_off_line_share']:.0%} of the growth off a straight line" if g['rss_off_line_share'] is not None else "")
                + ")") + (
                f". This is the part that scales with tokens x vocabulary (GKD's full logits). opsd's *total* peak RSS is "
                f"not flat: {o['peak_rss_gb'][0]:.2f} → {o['peak_rss_gb'][1]:.2f} GB, because the model itself grows "
                f"(the tied embedding/lm_head)"
                + (f"; DistillationTrainer, which never builds full logits either, grows "
                   f"{shape['distill']['rss_growth_beyond_state_gb']:+.2f} GB beyond its state" if "distill" in shape else ""))
        out += [f"Expected shape (issue 13: opsd's memory flat in the vocabulary, TRL's linear): {verdict}.", ""]
    return out


def rollout(roll: dict | None, status: str) -> list[str]:
    out = ["### 3. Rollout throughput on BFCL (`bench/rollout.py`)", ""]
    if not roll:
        return out + [f"Not measured: {status}.", ""]
    c, s = roll["config"], roll["sides"]
    out += [f"First {c['limit']} tasks of `{c['tasks']}` (the prompts of issue 16's vLLM-CPU measurement), same "
            f"prompts (`opsd.render.prompt_ids` + `<tool_call>\\n` prefill), greedy, max_new_tokens {c['max_new_tokens']}, "
            f"CPU. naive = batch-{c['naive_batch']} `model.generate` on the tasks in order (a batch runs until its longest "
            "row ends); opsd = `opsd rollout` (hf backend, batch size from memory). Each side in its own process, time "
            f"includes model load; {c['rounds']} rounds at {c['precision']} (speed-up per round, headline = lowest round), "
            "then one round at fp32.", "",
            "| side | precision | items/s per round | prompt tokens/s | generated tokens/s | same reply as naive (all tokens) | "
            "load average; others' CPU |", "|---|---|---|---|---|---|---|"]
    rows = [(k, v) for k, v in s.items()] + [(k, v) for k, v in roll.get("fp32", {}).get("sides", {}).items()]
    for k, v in rows:
        d = v.get("decode") or {}
        same = v.get("same_reply_as_naive") if v["precision"] == c["precision"] else \
            roll.get("fp32", {}).get("opsd_same_reply_as_naive") if k == "opsd" else None
        out.append(f"| {k} | {v['precision']} | {', '.join(f'{x:.3f}' for x in v['runs'])} | "
                   f"{d.get('prompt_tokens_per_s') or 0:.0f} | {d.get('generated_tokens_per_s') or 0:.0f} | "
                   f"{(str(same['identical']) + '/' + str(same['n'])) if same else ('reference' if k == 'naive' else '')} | "
                   f"{_load(v['rounds'][-1])} |")
    out += ["", f"Speed-up of `opsd rollout` over naive `generate` at {c['precision']}: per round "
            + ", ".join(f"{x:.2f}×" for x in roll["speedup_per_round"]) + f"; **lowest {roll['rollout_speedup']:.2f}×**."
            + (f" At fp32: {roll['fp32']['speedup']:.2f}×." if roll.get("fp32") else ""), ""]
    o = s["opsd"]
    if o.get("decode"):
        d = o["decode"]
        out += [f"Where opsd's time goes ({c['precision']}, {d['rows']} replies): prefill {d['prefill_s']:.1f} s for "
                f"{d['prompt_tokens']} prompt tokens ({d['padded_prefill_tokens']} with padding) = "
                f"{d['prompt_tokens_per_s']:.0f} tokens/s; decode {d['decode_s']:.1f} s for {d['generated_tokens']} "
                f"generated tokens in {d['decode_steps']} steps ({d['row_steps']} row-steps computed) = "
                f"{d['generated_tokens_per_s']:.0f} tokens/s.", ""]
    vllm, source = vllm_reference(roll)
    if vllm:
        t = c["limit"] / max(o["runs"])
        out += [f"vLLM-CPU comparison ({source}; not this run): opsd's hf backend at {c['precision']} took {t:.0f} s in "
                f"its best round (model load included) = **{t / vllm:.2f}×** vLLM's {vllm:.1f} s (target ≤ 1.5×).", ""]
    p = roll.get("profile")
    if p:
        ps = p["profile_stats"]
        out += [f"Profile ({p['precision']}): naive `generate` with 1 new token (its prefill alone) on the same batches "
                f"took {p['naive_prefill_s']:.1f} s for {p['naive_padded_prompt_tokens']} padded prompt tokens. opsd "
                f"decodes {p['opsd_rows']} rows at once here; one such batch with 16 new tokens: prefill "
                f"{ps['prefill_s']:.1f} s, decode {ps['decode_s']:.1f} s. torch.profiler of that batch, top ops by self "
                "CPU time:", "", "```", p["profile"].rstrip(), "```", ""]
    return out


def vllm_reference(roll: dict, results_dir: Path = RESULTS) -> tuple[float | None, str]:
    """vLLM-CPU's warm wall time on the same prompts: bench/results/rollout_vllm.json (bench/rollout_vllm.py, same
    machine) when it exists, else issue 16's figure; None when the rollouts ran at another precision than bf16."""
    if roll["config"]["precision"] != "bf16":  # vLLM-CPU was measured at bf16, on a CPU with bf16 units
        return None, "vLLM-CPU was measured at bf16 only, on an AVX512-BF16 CPU"
    path = results_dir / "rollout_vllm.json"
    if path.exists():
        v = json.loads(path.read_text())
        warm = v.get("sides", {}).get("vllm_warm", {}).get("wall_s")
        if warm and v.get("n") == roll["config"]["limit"] and v.get("tasks") == roll["config"]["tasks"]:
            return warm, f"bench/rollout_vllm.py: {warm:.1f} s warm, same {v['n']} prompts, bf16, all requests in flight"
    return roll.get("vllm_warm_s"), f"issue 16: {roll.get('vllm_warm_s')} s warm, same 64 prompts, bf16"


def numerics(num: dict | None, roll: dict | None, status: str = "not run") -> list[str]:
    out = ["### 4. bf16 vs fp32: does bf16 change an outcome? (`bench/numerics.py`, `bench/rollout.py`)", ""]
    if num:
        h = num["summary"]["hint_effect"]
        out += [f"Real data: {num['config']['rollouts']} SmolLM2 BFCL rollouts (tests/fixtures), critiqued by the "
                f"schema+reference critics, {num['examples']} hinted examples built as `opsd hint` builds them.", "",
                f"- **Hint effect per example** (`opsd.hint.measure`, fp32 weights vs bf16 weights, n={h['n']}): mean "
                f"{h['mean_fp32']:.3f} (fp32) vs {h['mean_bf16']:.3f} (bf16) nats; |bf16 − fp32| median "
                f"{h['abs_diff_median']:.4f}, 90th percentile {h['abs_diff_p90']:.4f}, max {h['abs_diff_max']:.4f} nats, "
                f"against a spread of {h['spread_fp32']:.3f} across examples (correlation {h['correlation']:.4f}). "
                f"The sign (does the hint lower the error?) agrees for {h['sign_agrees']} of {h['n']} examples; kept by "
                f"`opsd train`'s default filter (hint effect < 0): {h['kept_fp32']} (fp32) vs {h['kept_bf16']} (bf16), "
                f"{h['kept_by_one_only']} kept by one precision only."]
        lg = num["summary"].get("loss_grad")
        if lg:
            out += [f"- **Loss and gradient norm on the same batch** (OPSD JSD on the span, {lg['batches']} batches of "
                    f"{num['config']['batch']} examples; bf16 autocast with fp32 master weights vs fp32): loss relative "
                    f"difference median {lg['loss_rel_diff_median']:+.2%}, max |.| {lg['loss_rel_diff_abs_max']:.2%}; "
                    f"gradient norm median {lg['grad_norm_rel_diff_median']:+.2%}, max |.| "
                    f"{lg['grad_norm_rel_diff_abs_max']:.2%}; cosine between the two gradients median "
                    f"{lg['grad_cosine_median']:.4f}, min {lg['grad_cosine_min']:.4f}."]
        out.append("")
    nm = (roll or {}).get("numerics")
    if nm:
        g = nm["greedy_bf16_vs_fp32"]
        fd = g["first_divergence"]
        out += [f"- **Greedy rollouts** (`opsd rollout`, {g['n']} BFCL tasks, bf16 vs fp32): identical replies "
                f"{g['identical']}/{g['n']}; where they differ, the first differing token is at position "
                + (f"median {g['first_divergence_median']:.0f} (min {fd[0]}, max {fd[-1]})" if fd else "–")
                + f". naive `generate` bf16 vs fp32: {nm['naive_bf16_vs_fp32']['identical']}/{g['n']} identical."]
        for k, name in (("parse_ok", "parsed tool call"), ("right_name", "right function name (first call)")):
            r = nm[k]
            out.append(f"- {name}: fp32 {r['before']['count']}/{r['n']}, bf16 {r['after']['count']}/{r['n']} "
                       f"(difference {r['diff']:+.3f}, 95% CI {r['ci95']}, exact McNemar p = {r['p']:.3f}: "
                       f"{r['direction']}).")
        out.append("")
    if not num and not nm:
        out += [f"Not measured in this run: {status}.", ""]
    return out


def critic(crit: dict | None, status: str) -> list[str]:
    out = ["### 5. LLM critic throughput vs concurrency (`bench/critic.py`)", ""]
    if not crit:
        return out + [f"Not measured: {status}.", ""]
    lat = crit["latency_s"]
    out += ["`opsd_critic.runner.run_critiques` with `LLMCritic` against `opsd_critic.fake_server.FakeServer` in its "
            f"own process, fixed latency {lat * 1000:.0f} ms, answering every request with a valid `error` critique "
            "(so each reply is schema-checked, validated and appended with fsync). Every trajectory is distinct; "
            "each level runs 8 requests per slot (at least 32), median of 3 runs. Ideal = concurrency / latency.", "",
            "| concurrency | critiques/s | ideal | efficiency | runs |", "|---|---|---|---|---|"]
    for r in crit["rows"]:
        out.append(f"| {r['concurrency']} | {r['rate']:.1f} | {r['ideal']:.0f} | {r['efficiency']:.0%} | {r['runs']} |")
    if crit.get("rows_shipped"):
        out += ["", "With Nagle on (`FakeServer(nodelay=False)`): every request costs the latency + ~44 ms (the "
                "client's delayed ACK); real servers set `TCP_NODELAY`, as `FakeServer` does by default.", "",
                "| concurrency | critiques/s | ideal | efficiency |", "|---|---|---|---|"]
        for r in crit["rows_shipped"]:
            out.append(f"| {r['concurrency']} | {r['rate']:.1f} | {r['ideal']:.0f} | {r['efficiency']:.0%} |")
    if crit.get("profile"):
        out += ["", "Client profile (cProfile, concurrency 32; `poll` is the event loop waiting on the server):", "",
                "```", crit["profile"].rstrip(), "```"]
    return out + [""]
