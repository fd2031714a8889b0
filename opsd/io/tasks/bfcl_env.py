"""BFCL's simulated multi-turn environments, run in-process and safely.

    from opsd.io.tasks.bfcl_env import Environment
    env = Environment(["GorillaFileSystem", "TwitterAPI"], initial_config, tools=["ls", "cd", ...])
    env.call("cd", {"folder": "document"})        # -> the result text the model reads (BFCL's formatting)
    env.parse_call("mv(source='a.txt', destination='temp')")   # a ground-truth string -> ("mv", {...})

Only the pure-Python simulated classes of `bfcl_eval.eval_checker.multi_turn_eval.func_source_code`
listed in `SIMULATED_CLASSES` are ever instantiated: a file system, math, messaging, posting,
ticketing, trading, travel and vehicle control. They keep their whole state in memory; nothing
touches the disk, the network or a process. A call runs a public method of one of those
instances, looked up by name among the tools the task declares, with keyword arguments that are
plain JSON values. Unlike BFCL's own executor (`multi_turn_utils.execute_multi_turn_func_call`),
nothing is ever passed to `eval`: model output cannot run code. Each call has a wall-clock cap
(`call_seconds`, enforced with SIGALRM in the main thread; elsewhere only the episode's caps
apply). Results are formatted exactly like BFCL's executor (a str as is, a dict as JSON,
anything else `str()`; an exception as `Error during execution: ...`), so BFCL's response
checker compares them as it would its own.

Left out (`NOT_SIMULATED`): `WebSearchAPI` (needs the network: SerpAPI and page fetches) and the
`MemoryAPI_*` back-ends (memory categories: prerequisite conversations, files on disk, and for
`MemoryAPI_vector` a sentence-transformers model to download).
"""
from __future__ import annotations

import ast
import copy
import decimal
import importlib
import inspect
import json
import keyword
import math
import random
import signal
import threading
import time
from collections.abc import Iterable
from contextlib import contextmanager

FUNC_SOURCE = "bfcl_eval.eval_checker.multi_turn_eval.func_source_code"
SIMULATED_CLASSES = {
    "GorillaFileSystem": "gorilla_file_system",
    "MathAPI": "math_api",
    "MessageAPI": "message_api",
    "TwitterAPI": "posting_api",
    "TicketAPI": "ticket_api",
    "TradingBot": "trading_bot",
    "TravelAPI": "travel_booking",
    "VehicleControlAPI": "vehicle_control",
}
STATELESS_CLASSES = ("MathAPI",)  # no scenario to load (as in BFCL)
NOT_SIMULATED = {
    "WebSearchAPI": "needs the network (SerpAPI search and page fetches)",
    "MemoryAPI_kv": "memory categories: prerequisite conversations and memory files on disk",
    "MemoryAPI_vector": "memory categories: downloads a sentence-transformers model; files on disk",
    "MemoryAPI_rec_sum": "memory categories: prerequisite conversations and memory files on disk",
}
ERROR_PREFIX = "Error during execution: "


class ToolTimeout(Exception):
    """A tool call ran past its wall-clock cap."""


@contextmanager
def time_limit(seconds: float | None):
    """Raise ToolTimeout in the block after `seconds` (main thread, POSIX); elsewhere no cap.

    An interval timer already running (e.g. pytest-timeout's) is restored afterwards, minus the time spent.
    """
    usable = (seconds and seconds > 0 and hasattr(signal, "setitimer")
              and threading.current_thread() is threading.main_thread())
    if not usable:
        yield
        return

    def _raise(signum, frame):
        raise ToolTimeout(f"timed out after {seconds:g} s")

    old_handler = signal.signal(signal.SIGALRM, _raise)
    t0 = time.monotonic()
    old_delay, old_interval = signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old_handler)
        if old_delay > 0:
            signal.setitimer(signal.ITIMER_REAL, max(old_delay - (time.monotonic() - t0), 1e-3), old_interval)


def format_result(value) -> str:
    """A method's return value as BFCL's executor writes it into the conversation."""
    if type(value) is str:
        return value
    if type(value) is dict:
        try:
            return json.dumps(value)
        except (TypeError, ValueError):
            return str(value)
    return str(value)


def is_json_value(v, depth: int = 0) -> bool:
    """Plain JSON data only (str, int, finite float, bool, None, lists, str-keyed dicts), at most 32 levels deep."""
    if depth > 32:
        return False
    if v is None or isinstance(v, (str, bool, int)):
        return True
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, list):
        return all(is_json_value(x, depth + 1) for x in v)
    if isinstance(v, dict):
        return all(isinstance(k, str) and is_json_value(x, depth + 1) for k, x in v.items())
    return False


def call_string(name: str, arguments: dict) -> str | None:
    """`name(k=v, ...)` in BFCL's executable format, for BFCL's own checker; None when it would not be a
    plain call of a named function with literal JSON arguments (then it must not reach BFCL's `eval`)."""
    if not (isinstance(name, str) and name.isidentifier() and not keyword.iskeyword(name)):
        return None
    if not isinstance(arguments, dict) or not is_json_value(arguments):
        return None
    if not all(k.isidentifier() and not keyword.iskeyword(k) for k in arguments):
        return None
    s = f"{name}({', '.join(f'{k}={v!r}' for k, v in arguments.items())})"
    tree = ast.parse(s, mode="eval")  # repr of JSON values is a literal; checked anyway
    ok = isinstance(tree.body, ast.Call) and isinstance(tree.body.func, ast.Name) and not tree.body.args
    return s if ok and all(_is_literal(kw.value) for kw in tree.body.keywords) else None


def _is_literal(node: ast.AST) -> bool:
    try:
        ast.literal_eval(node)
        return True
    except (ValueError, TypeError, SyntaxError, RecursionError):
        return False


MAX_RESULT_DIGITS = 10_000


def too_costly(cls: str, name: str, args: dict) -> str | None:
    """Why a call would run away inside C code (where no timer can stop it), or None.

    Only two simulated functions can: `MathAPI.power` with integers (an exact power of any size) and
    `MathAPI.square_root` (a decimal precision of any size). Both are refused above
    `MAX_RESULT_DIGITS` digits; every other call is bounded by its arguments' size.
    """
    if cls != "MathAPI":
        return None
    if name == "power":
        b, e = args.get("base"), args.get("exponent")
        if type(b) is int and type(e) is int and e > 0 and e * math.log10(max(abs(b), 2)) > MAX_RESULT_DIGITS:
            return f"refused: the result would have more than {MAX_RESULT_DIGITS} digits"
    if name == "square_root":
        p = args.get("precision")
        if type(p) is int and p > MAX_RESULT_DIGITS:
            return f"refused: precision above {MAX_RESULT_DIGITS} digits"
    return None


class Environment:
    """The simulated API instances of one BFCL multi-turn episode (see the module docstring).

    `tools`: the function names the model may call (the task's declared tools); `allow()` adds
    more (BFCL's miss_func turns). `call_seconds`: wall-clock cap per call.
    """

    def __init__(self, involved_classes: Iterable[str], initial_config: dict | None = None, *,
                 long_context: bool = False, tools: Iterable[str] | None = None, call_seconds: float | None = 10.0):
        self.instances: dict[str, object] = {}
        self._owner: dict[str, str] = {}  # method name -> class name (a later class wins, as in BFCL)
        for cls in involved_classes:
            if cls not in SIMULATED_CLASSES:
                why = NOT_SIMULATED.get(cls, "not one of BFCL's simulated multi-turn classes")
                raise ValueError(f"class {cls!r} is not run by opsd: {why}; "
                                 f"simulated classes: {', '.join(SIMULATED_CLASSES)}")
            module = importlib.import_module(f"{FUNC_SOURCE}.{SIMULATED_CLASSES[cls]}")
            inst = getattr(module, cls)()
            if cls not in STATELESS_CLASSES:
                inst._load_scenario(copy.deepcopy((initial_config or {}).get(cls, {})), long_context=long_context)
            self.instances[cls] = inst
            for name, _ in inspect.getmembers(inst, predicate=inspect.ismethod):
                if not name.startswith("_"):
                    self._owner[name] = cls
        self.allowed: set[str] = set(self._owner) if tools is None else {t for t in tools if t in self._owner}
        self.call_seconds = call_seconds

    def allow(self, names: Iterable[str]) -> None:
        """Make more declared functions callable (held-out functions added at a later turn)."""
        self.allowed |= {n for n in names if n in self._owner}

    def method(self, name: str):
        """The bound method a declared, allowed function name runs; None otherwise."""
        if name not in self.allowed or name not in self._owner:
            return None
        return getattr(self.instances[self._owner[name]], name)

    def call(self, name: str, arguments) -> str:
        """Run one call; always returns the result text (errors included, in BFCL's format)."""
        fn = self.method(name) if isinstance(name, str) else None
        if fn is None:
            return f"{ERROR_PREFIX}function {name!r} is not available"
        if not isinstance(arguments, dict) or not is_json_value(arguments):
            return f"{ERROR_PREFIX}arguments must be a JSON object"
        refused = too_costly(self._owner[name], name, arguments)
        if refused:
            return f"{ERROR_PREFIX}{refused}"
        try:
            with time_limit(self.call_seconds), decimal.localcontext():  # MathAPI sets the decimal precision
                return format_result(fn(**arguments))
        except Exception as e:  # the simulated API's own errors, bad keywords, ToolTimeout
            return f"{ERROR_PREFIX}{e}"

    def parse_call(self, text: str) -> tuple[str, dict]:
        """A BFCL ground-truth call string (`f(a=1)`, positional arguments allowed) -> (name, keyword arguments).

        Only a call of a bare name with literal arguments is accepted (ValueError otherwise); positional
        arguments are named from the method's signature.
        """
        try:
            tree = ast.parse(text.strip(), mode="eval")
        except SyntaxError as e:
            raise ValueError(f"not a call: {text!r} ({e.msg})") from None
        node = tree.body
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)):
            raise ValueError(f"not a call of a function name: {text!r}")
        name = node.func.id
        if name not in self._owner:
            raise ValueError(f"{name!r} is not a function of {', '.join(self.instances)}")
        args = {kw.arg: ast.literal_eval(kw.value) for kw in node.keywords if kw.arg is not None}
        if node.args:
            params = [p for p in inspect.signature(getattr(self.instances[self._owner[name]], name)).parameters]
            for p, a in zip(params, node.args):
                args[p] = ast.literal_eval(a)
        return name, args

    def state(self) -> dict[str, dict]:
        """{class: {public attribute: value}}: what BFCL's state checker compares."""
        return {c: {k: v for k, v in vars(i).items() if not k.startswith("_")} for c, i in self.instances.items()}

    def same_state(self, other: Environment) -> bool:
        """BFCL's state check: every public attribute of every instance is equal."""
        return self.differences(other) == {}

    def differences(self, other: Environment) -> dict[str, list[str]]:
        """{class: [attributes that differ]} against `other` (empty: same state)."""
        out = {}
        a, b = self.state(), other.state()
        for c in set(a) | set(b):
            keys = set(a.get(c, {})) | set(b.get(c, {}))
            bad = sorted(k for k in keys if a.get(c, {}).get(k, _MISSING) != b.get(c, {}).get(k, _MISSING))
            if bad:
                out[c] = bad
        return out

    def full_state(self) -> dict[str, dict]:
        """`state()` plus the private attributes that steer later calls (the file system's current directory, as
        a path): what a call may change without BFCL's state check seeing it. Random generators are left out."""
        out = self.state()
        for c, inst in self.instances.items():
            for k, v in vars(inst).items():
                if k.startswith("_") and k != "_api_description" and not isinstance(v, random.Random):
                    out[c][k] = _path(v) if hasattr(v, "parent") and hasattr(v, "contents") else v
        return out

    def changed_since(self, other: Environment) -> bool:
        """Whether anything that BFCL checks, or that steers later calls, differs from `other`."""
        return self.full_state() != other.full_state()

    def copy(self) -> Environment:
        """An independent deep copy (for trying a call without changing this environment)."""
        return copy.deepcopy(self)


_MISSING = object()


def _path(directory) -> str:
    """A file-system directory as its path from the root (its identity, unlike Directory.__eq__)."""
    names = []
    while directory is not None:
        names.append(directory.name)
        directory = directory.parent
    return "/".join(reversed(names))
