"""The official BFCL AST checker, imported without its model-handler dependencies.

The stub of `bfcl_eval.constants.model_config` and the checker itself now live in library code,
`opsd.eval.official` (the evaluation scores every reply with it); the tests import them from there.
"""
from __future__ import annotations

from opsd.eval.official import official_checker, official_valid, raw_functions  # noqa: F401
