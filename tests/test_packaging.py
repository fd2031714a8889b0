"""`pip install .` (not editable) gives working packages with templates and schemas inside.

The folders critic/ and prompts/ install as `opsd_critic` and `opsd_prompts` (pyproject `package-dir`), so a user's
own critic/ or prompts/ folder cannot shadow them (issue 24; tests/test_install_names.py checks the editable install).
"""
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import INSTALLED_AS, ROOT

SHIPPED = (".py", ".j2", ".json", ".md")  # code and package data


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    out = tmp_path_factory.mktemp("wheel")
    r = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", str(ROOT),
                        "-w", str(out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    (whl,) = out.glob("opsd-*.whl")
    return whl


def test_wheel_ships_packages_prompts_and_schemas(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("opsd/cli.py", "opsd/render.py", "opsd/io/tasks/bfcl.py", "opsd/io/schemas/trajectory.schema.json",
                     "opsd_critic/__init__.py", "opsd_prompts/__init__.py", "opsd_prompts/tools_system.j2",
                     "opsd_prompts/critic/locate_error.j2", "opsd_prompts/critic/reply.schema.json",
                     "opsd_prompts/hints/fallback.j2"):
        assert required in names, required
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "opsd = opsd.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
    assert not any(n.startswith(("tests/", "data/", "bench/")) for n in names)


def test_wheel_has_every_file_under_its_import_name_and_no_generic_top_level_names(wheel):
    """pyproject lists the packages by hand (setuptools cannot find and rename at once): a folder left off the list
    would silently not ship. Every code/data file of opsd/, critic/, prompts/ is in the wheel, under its import name."""
    names = set(zipfile.ZipFile(wheel).namelist())
    want = {f"{INSTALLED_AS[folder]}/{p.relative_to(ROOT / folder).as_posix()}"
            for folder in INSTALLED_AS for p in (ROOT / folder).rglob("*")
            if p.suffix in SHIPPED and "__pycache__" not in p.parts}
    assert sorted(want - names) == []
    assert sorted(n for n in names if n.split("/")[0] in ("critic", "prompts")) == []


def test_installed_wheel_works_outside_the_repo(wheel, tmp_path):
    """Installed, next to a user's own critic/ and prompts/ packages: both the user's and ours import."""
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    for folder in ("critic", "prompts"):
        (tmp_path / folder).mkdir()
        (tmp_path / folder / "__init__.py").write_text("MINE = True\n")
    code = ("import opsd, opsd_critic, opsd_prompts, opsd.render as r, critic, prompts; "
            "from opsd_critic.base import hint_templates_hash, render_hint; "
            "from opsd_critic.llm_prompt import load_prompt; assert critic.MINE and prompts.MINE; "
            "load_prompt(); render_hint('fallback', variant=0); hint_templates_hash(); "
            "print(opsd.__file__, opsd_prompts.__file__); "
            "print(r.tools_system_text([{'type': 'function', 'function': {'name': 'f'}}])[:7])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert out.stdout.count(str(target)) == 2 and "# Tools" in out.stdout
