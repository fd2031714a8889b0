"""Which machine a benchmark ran on: the CPU's ISA features, its kind, and the precision `auto` picks there.

    python bench/machine.py          # prints this machine's facts as JSON (kind, isa, precision, ...)

Figures measured on a CPU with bf16 units (AVX512-BF16, AMX) do not hold on one without (AVX2 only):
`precision=auto` runs bf16 on the first and fp32 on the second, and the step is ~2x slower. So every
run of `make bench` records the features read from /proc/cpuinfo and the precision chosen, its raw
results go to bench/results/KIND/, and BENCHMARKS.md holds one section per kind (bench/report.py).
"""
from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
FEATURES = ("avx2", "avx512f", "avx512_bf16", "amx_bf16")  # the /proc/cpuinfo flags that decide the kind
# kind -> its label in BENCHMARKS.md; the first kind whose flag the CPU has (order: best bf16 units first)
KINDS = {"amx_bf16": "AMX-BF16", "avx512_bf16": "AVX512-BF16",
         "avx512f": "AVX-512 without bf16 units", "avx2": "AVX2 only (no AVX-512, no bf16 units)"}
OTHER_KIND = "other"  # none of FEATURES (e.g. not x86, or no /proc/cpuinfo)


def cpu_isa(cpuinfo: str) -> dict:
    """{"model_name": str, FEATURE: bool for each of FEATURES} from the text of /proc/cpuinfo (its first CPU)."""
    model, flags = "", set()
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key == "model name" and not model:
            model = value.strip()
        elif key in ("flags", "Features") and not flags:  # x86 / arm
            flags = set(value.split())
    return {"model_name": model} | {f: f in flags for f in FEATURES}


def cpu_kind(isa: dict) -> str:
    """The kind BENCHMARKS.md files a run under: the best of amx_bf16 > avx512_bf16 > avx512f > avx2, else "other"."""
    return next((k for k in KINDS if isa.get(k)), OTHER_KIND)


def kind_label(kind: str) -> str:
    return KINDS.get(kind, "other CPU (no AVX2)" if kind == OTHER_KIND else kind)


def kind_of_facts(facts: dict) -> str:
    """The kind of a run's facts; a run recorded before the ISA was (facts without "kind") from its `bf16` field."""
    if facts.get("kind"):
        return facts["kind"]
    bf16 = facts.get("bf16") or ""
    return "amx_bf16" if "AMX" in bf16 else "avx512_bf16" if "AVX512-BF16" in bf16 else OTHER_KIND


def precision_of_facts(facts: dict) -> str:
    """The precision `auto` chose in that run (bf16 where the CPU has bf16 units, for runs recorded before it was)."""
    return facts.get("precision") or ("bf16" if kind_of_facts(facts) in ("amx_bf16", "avx512_bf16") else "fp32")


def read_isa() -> dict:
    try:
        text = Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        text = ""
    isa = cpu_isa(text)
    isa["model_name"] = isa["model_name"] or platform.processor() or platform.machine()
    return isa


def machine_facts() -> dict:
    """Date, CPU (model, ISA features, kind), the precision `auto` picks, cores, memory, versions, commit."""
    import torch
    import transformers

    from opsd.io.models import resolve_precision

    isa = read_isa()
    mem = None
    try:
        mem = int(next(x for x in Path("/proc/meminfo").read_text().splitlines() if x.startswith("MemTotal")).split()[1]) / 2**20
    except (OSError, StopIteration):
        pass
    try:
        import trl

        trl_v = trl.__version__
    except ImportError:
        trl_v = "not installed"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--", "opsd", "critic", "prompts"], cwd=ROOT,
                           capture_output=True, text=True).stdout.split("\n")
    dirty = sorted({x[3:].strip() for x in dirty if x.strip()})
    if dirty:  # the benchmarks import the working tree, so say what it held
        commit += f" + uncommitted changes in {', '.join(dirty)}"
    bf16 = ", ".join(n for n, ok in (("AVX512-BF16", torch.cpu._is_avx512_bf16_supported()),
                                     ("AMX", torch.cpu._is_amx_tile_supported())) if ok) or "none"
    return {"date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "cpu": isa["model_name"],
            "isa": {f: isa[f] for f in FEATURES}, "kind": cpu_kind(isa), "bf16": bf16,
            "precision": resolve_precision("auto", "cpu"),
            "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "mem_gb": mem,
            "python": platform.python_version(), "torch": torch.__version__, "transformers": transformers.__version__,
            "trl": trl_v, "commit": commit, "platform": platform.platform()}


if __name__ == "__main__":
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    print(json.dumps(machine_facts(), indent=2))
