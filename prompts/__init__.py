"""Prompt and hint templates (data, not code). Shipped inside the wheel.

`opsd_prompts.path(name)` gives the installed location of a template, e.g. "critic/locate_error.j2".
"""
from importlib import resources
from pathlib import Path


def path(name: str) -> Path:
    return Path(str(resources.files("opsd_prompts").joinpath(name)))


def read(name: str) -> str:
    return resources.files("opsd_prompts").joinpath(name).read_text("utf-8")
