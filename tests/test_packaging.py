"""`pip install .` (not editable) gives working packages with templates and schemas inside."""
import subprocess
import sys
import zipfile

import pytest

from tests.conftest import ROOT


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
                     "critic/__init__.py", "prompts/__init__.py", "prompts/tools_system.j2"):
        assert required in names, required
    entry = next(n for n in names if n.endswith("entry_points.txt"))
    assert "opsd = opsd.cli:main" in zipfile.ZipFile(wheel).read(entry).decode()
    assert not any(n.startswith(("tests/", "data/", "bench/")) for n in names)


def test_installed_wheel_works_outside_the_repo(wheel, tmp_path):
    target = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True)
    code = ("import opsd, critic, prompts, opsd.render as r; "
            "print(opsd.__file__); print(r.tools_system_text([{'type': 'function', 'function': {'name': 'f'}}])[:7])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path,
                         env={"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin"})
    assert out.returncode == 0, out.stderr
    assert str(target) in out.stdout and "# Tools" in out.stdout
