"""Training tests share the fixtures of tests/conftest.py."""
from tests.conftest import CRITIQUES, TRAJECTORIES, save_tiny, tiny_llama  # noqa: F401
