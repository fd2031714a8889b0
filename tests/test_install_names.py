"""A user's own `critic/` or `prompts/` folder next to their script does not shadow ours (issue 24).

The folders critic/ and prompts/ install as `opsd_critic` and `opsd_prompts` (pyproject `package-dir`). Under their
folder names, `import prompts` in opsd found the user's package first (sys.path[0] is the script's folder):
`AttributeError: module 'prompts' has no attribute 'read'`. This runs the installed (editable) opsd from such a
folder; tests/test_packaging.py does the same with the wheel.
"""
import ast
import os
import subprocess
import sys

from tests.conftest import ROOT, TRAJECTORIES

# every template family through opsd's own API: the tools system prompt, the hint message, the rule critics'
# hints (prompts/hints/*.j2) and the LLM critic's prompt (prompts/critic/locate_error.j2, loaded on construction)
SCRIPT = """\
import asyncio
import sys

import critic
import prompts
import opsd.cli
from opsd.critique.config import CriticConfig
from opsd.critique.run import build_critic
from opsd.hint.build import hint_message_text
from opsd.io.trajectories import load_trajectories
from opsd.render import tools_system_text

assert critic.MINE and prompts.MINE  # the user's packages are the ones their names import
print(tools_system_text([{"type": "function", "function": {"name": "f"}}]).splitlines()[0])
print(hint_message_text("x"))
rule = build_critic(CriticConfig(name="schema+reference"))
print(sum(bool(asyncio.run(rule.critique(t)).hint) for t in load_trajectories([sys.argv[1]])), "hints")
llm = build_critic(CriticConfig(name="llm", base_url="http://127.0.0.1:9/v1", model="m"))
print(type(llm).__module__, "tool" in llm.render_prompt(load_trajectories([sys.argv[1]])[0]))
"""


def test_opsd_works_next_to_a_users_critic_and_prompts_packages(tmp_path):
    for folder in ("critic", "prompts"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("MINE = True\n")
    (tmp_path / "script.py").write_text(SCRIPT)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OPENAI_API_KEY": "unused"}
    out = subprocess.run([sys.executable, "script.py", str(TRAJECTORIES)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.splitlines()
    assert lines[0] == "# Tools" and lines[1].startswith("Hint for your next reply: x")
    assert int(lines[2].split()[0]) > 0
    assert lines[3] == "opsd_critic.llm True"


def test_no_code_imports_the_folder_names():
    """`import critic` / `from prompts import ...` would find a user's package again: only the installed names."""
    offenders = []
    for folder in ("opsd", "critic", "prompts", "tests", "bench", "scripts", "examples"):
        for path in (ROOT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text("utf-8"))):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                    [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module else []
                offenders += [f"{path.relative_to(ROOT)}: {n}" for n in names
                              if n.split(".")[0] in ("critic", "prompts")]
    assert offenders == []
