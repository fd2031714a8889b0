"""Profile eval stage 4 (teacher_forced_all) on the s2 run's held-out base replies."""
import sys, time, cProfile, pstats, torch
from pathlib import Path
from opsd.eval.config import EvalConfig
from opsd.eval import run as er
from opsd.io import models
from opsd.rollout.config import RolloutConfig
from opsd.rollout.run import load_rollouts
from opsd.critique.config import CriticConfig
from opsd.critique.run import critique_fn
R = Path("/work/exp/d3_orig/report")
bs = int(sys.argv[1]) if len(sys.argv) > 1 else 8
cfg = EvalConfig(tasks="bfcl:simple_python,multiple:heldout", limit=128, max_new_tokens=128, score_batch_size=bs,
                 out="/tmp/prof_tf")
trajs = load_rollouts(RolloutConfig(tasks=cfg.tasks, out=str(R / "rollouts_before.jsonl"), limit=128))
trajs = trajs[:32]
crit = critique_fn(CriticConfig(name="schema+reference", all_errors=True), progress=False)(trajs, Path("/tmp/prof_tf3_crit32.jsonl"))
a, tok = models.load("smollm2-135m-instruct")
b, _ = models.load("/work/exp/d3/cold_start/train/model")
pre = tok("<tool_call>\n", add_special_tokens=False)["input_ids"]
t = time.time()
pr = cProfile.Profile(); pr.enable()
with torch.no_grad():
    res, drift, gt = er.teacher_forced_all(a, b, tok, trajs, crit, cfg, pre)
pr.disable()
print("wall", time.time() - t, "n", res["n_examples"], res.get("error_span_logprob"))
pstats.Stats(pr).sort_stats("cumulative").print_stats(40)
