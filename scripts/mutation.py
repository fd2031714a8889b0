"""`make mutation`: test strength of the core pure-logic modules, measured with mutmut (3.8).

    .venv/bin/python scripts/mutation.py                 # all MODULES, 2 workers, a fresh temp copy
    .venv/bin/python scripts/mutation.py --keep          # keep the copy (then `cd DIR && mutmut browse`)
    .venv/bin/python scripts/mutation.py --modules critic/calls.py --workdir /tmp/m   # one module, reusable dir

mutmut rewrites the sources under `mutants/` and runs the tests there, so it runs in a COPY of the
working tree (tracked files plus untracked, non-ignored ones: what `git ls-files` lists), never in
the shared tree. The [tool.mutmut] config is written into the copy's pyproject.toml (below), so
the repository's own pyproject carries none and `mutmut` cannot be started in the tree by mistake.

Only the fast in-process tests of these modules run (TESTS, `-m "not slow"`); mutmut's stats pass
maps each mutated function to the tests that call it and runs only those per mutant.

Output: mutmut's log goes to DIR/mutmut.log; then one line per module and, last, exactly
    mutation_score=0.87 killed=N total=M
Score = (killed + timeouts) / total, 2 decimals. `killed` is mutmut's "killed" (a test failed);
a timeout is a mutant whose tests ran past mutmut's limit (SIGXCPU: status "timeout", or SIGKILL one
second after the CPU soft limit, exit -9): the mutant made the tests hang, which a test run detects
too, so it counts as detected but is not included in `killed`. Every other mutant (survived, no
tests, suspicious, ...) counts against the score; `total` is all mutants generated.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODULES = ("opsd/train/losses.py", "opsd/train/scoring.py", "opsd/hint/build.py",
           "critic/validate.py", "critic/calls.py")
TESTS = ("tests/train/test_losses.py", "tests/train/test_losses_edges.py",
         "tests/train/test_scoring.py", "tests/train/test_scoring_edges.py",
         "tests/hint/test_hinting.py", "tests/hint/test_hint_stage.py", "tests/hint/test_build_errors.py",
         "tests/critic/test_validate.py", "tests/critic/test_calls.py", "tests/critic/test_quote_mapping.py",
         "tests/critic/test_never_invalid.py", "tests/critic/test_error_tokens.py", "tests/critic/test_reference.py",
         "tests/critic/test_schema.py", "tests/critic/test_real_outputs.py", "tests/critic/test_critique_stage.py")
SIGKILL_AFTER_CPU_LIMIT = -9
# The copy lays the folders out under their import names (pyproject package-dir): mutmut names a mutant after its
# file's path (opsd_critic/calls.py -> opsd_critic.calls), which must be the module the tests import.
INSTALLED_AS = {"critic": "opsd_critic", "prompts": "opsd_prompts"}


def installed_path(rel: str) -> str:
    """critic/calls.py -> opsd_critic/calls.py: where a file of the working tree lies in the copy."""
    top, sep, rest = rel.partition("/")
    return INSTALLED_AS.get(top, top) + sep + rest if sep else rel


def copy_tree(dest: Path) -> None:
    """Tracked + untracked non-ignored files of the working tree (deleted ones skipped) into `dest`, critic/ and
    prompts/ under their import names."""
    out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                         check=True, capture_output=True).stdout
    for rel in sorted({p for p in out.decode().split("\0") if p}):
        src = ROOT / rel
        if src.is_file():
            (dest / installed_path(rel)).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / installed_path(rel))


def mutmut_config(modules: list[str], tests: list[str]) -> str:
    """[tool.mutmut] for `modules` (paths in the working tree: critic/calls.py) and `tests`."""
    modules = [installed_path(m) for m in modules]
    roots = sorted({m.split("/")[0] for m in modules})
    toml_list = lambda xs: "[" + ", ".join(json.dumps(x) for x in xs) + "]"
    return "\n".join([
        "", "[tool.mutmut]",
        f"source_paths = {toml_list([r + '/' for r in roots])}",
        f"only_mutate = {toml_list(modules)}",
        # what the tests import or read besides the source roots and tests/
        f"also_copy = {toml_list([p + '/' for p in ('opsd', *INSTALLED_AS.values(), 'data') if p not in roots])}",
        f"pytest_add_cli_args_test_selection = {toml_list(tests)}",
        'pytest_add_cli_args = ["-m", "not slow", "-p", "no:cacheprovider"]',
        "",
    ])


def tally(workdir: Path, modules: list[str]) -> dict[str, Counter]:
    """{module: Counter(status)} from mutmut's mutants/<module>.meta files."""
    from mutmut.stats import status_by_exit_code

    per_module = {}
    for m in modules:
        meta = workdir / "mutants" / (installed_path(m) + ".meta")
        codes = json.loads(meta.read_text())["exit_code_by_key"] if meta.exists() else {}
        c = Counter()
        for code in codes.values():
            c["timeout" if code == SIGKILL_AFTER_CPU_LIMIT else status_by_exit_code[code]] += 1
        per_module[m] = c
    return per_module


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modules", nargs="+", default=list(MODULES))
    ap.add_argument("--tests", nargs="+", default=list(TESTS))
    ap.add_argument("--max-children", type=int, default=2)
    ap.add_argument("--workdir", type=Path, help="copy into this dir (reused if it exists) instead of a temp dir")
    ap.add_argument("--keep", action="store_true", help="keep the copy (to browse survivors)")
    ap.add_argument("--fail-under", type=float, default=0.0, help="exit 1 if the score is below this")
    args = ap.parse_args()

    start = time.monotonic()
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="opsd-mutation-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tests = [t for t in args.tests if (ROOT / t).exists()]
    for t in sorted(set(args.tests) - set(tests)):
        print(f"mutation: warning: test file {t} does not exist, skipped", file=sys.stderr)
    copy_tree(workdir)
    with open(workdir / "pyproject.toml", "a") as f:
        f.write(mutmut_config(args.modules, tests))
    print(f"mutation: {len(args.modules)} modules, {len(tests)} test files, copy in {workdir}", flush=True)

    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false",
               PYTHONDONTWRITEBYTECODE="1")
    log = workdir / "mutmut.log"
    with open(log, "w") as f:
        rc = subprocess.run([str(Path(sys.executable).parent / "mutmut"), "run", "--max-children",
                             str(args.max_children)], cwd=workdir, env=env, stdout=f, stderr=subprocess.STDOUT).returncode
    if rc != 0:
        print(f"mutmut run failed (exit {rc}); its log: {log}\n" + "".join(log.read_text().splitlines(True)[-30:]),
              file=sys.stderr)
        return 1

    per_module = tally(workdir, args.modules)
    total = Counter()
    for m, c in per_module.items():
        total += c
        n = sum(c.values())
        others = ", ".join(f"{k}={v}" for k, v in sorted(c.items()) if k not in ("killed", "timeout"))
        print(f"  {m}: killed={c['killed']} timeout={c['timeout']} total={n}"
              f"{' (' + others + ')' if others else ''}")
    n = sum(total.values())
    score = (total["killed"] + total["timeout"]) / n if n else 0.0
    keep = bool(args.keep or args.workdir)
    print(f"timeouts={total['timeout']} (counted as detected, not in killed) wall={time.monotonic() - start:.0f}s"
          + (f"; survivors: cd {workdir} && {Path(sys.executable).parent}/mutmut results" if keep else ""))
    if not keep:
        shutil.rmtree(workdir, ignore_errors=True)
    print(f"mutation_score={score:.2f} killed={total['killed']} total={n}")
    return 1 if score < args.fail_under else 0


if __name__ == "__main__":
    sys.exit(main())
