"""opsd: targeted on-policy self-distillation for tool-calling agents.

A critic finds the step where a trajectory went wrong and writes a short hint; the same
model scores its own original tokens under the hint in one forward pass, and the hintless
student is trained to match those hinted distributions on the error span only.
"""
__version__ = "0.1.0"

from opsd.types import Critique, HintedExample, Trajectory  # noqa: F401
