"""The one place secrets are taken out of what opsd writes or prints: credentials in URLs, and named secret values.

    redact_url("http://user:KEY@host/v1?api-key=KEY2")   # -> "http://user:***@host/v1?api-key=***"
    redact_urls("POST http://host/v1?api-key=KEY failed")  # every URL inside a text
    redacted({"critic": {"base_url": ...}}, secrets=[env_key])  # a config dump, any depth: before any file gets it
    redact("... Bearer sk-123 ...", [api_key])           # named values (an API key from the environment)

Every config dump (loop.json, compare.json, eval and multi-turn report.json), the repr of every Config that holds
a URL (`CriticConfig`, `RolloutConfig`), the rollout meta and error lines, and server error messages go through
these. `opsd_critic.redact` re-exports them and adds the log filter (`redacting_logs`).
"""
from __future__ import annotations

import base64
import dataclasses
import re
from typing import Iterable
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

MASK = "***"
MIN_SECRET_CHARS = 6  # shorter values are not secrets worth masking (and would mangle every message)
_URL = re.compile(r"[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")


def url_secrets(url: str) -> list[str]:
    """Credentials inside a URL: every query value, the userinfo password, and the Basic-auth token an HTTP client
    makes of the userinfo (a server that echoes the Authorization header echoes that)."""
    parts = urlsplit(url or "")
    out = [v for _, v in parse_qsl(parts.query, keep_blank_values=False)]
    if parts.password:
        out += [parts.password, base64.b64encode(f"{parts.username or ''}:{parts.password}".encode()).decode()]
    return out


def redact_url(url: str) -> str:
    """`url` with every query value and the userinfo password replaced by ***."""
    try:
        parts = urlsplit(url)
    except ValueError:  # not a URL after all
        return url
    netloc = parts.netloc
    if parts.password is not None:
        netloc = f"{parts.username or ''}:{MASK}@{netloc.rpartition('@')[2]}"
    query = urlencode([(k, MASK) for k, _ in parse_qsl(parts.query, keep_blank_values=True)], safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def redact_urls(text: str) -> str:
    """`text` with the credentials of every URL in it replaced by *** (and their values wherever else they occur)."""
    secrets = [s for m in _URL.findall(text) for s in url_secrets(m)]
    return redact(_URL.sub(lambda m: redact_url(m.group()), text), secrets)


def redact(text: str, secrets: Iterable[str]) -> str:
    """`text` with every secret (of at least MIN_SECRET_CHARS chars) replaced by ***."""
    for s in sorted({s for s in secrets if s and len(s) >= MIN_SECRET_CHARS}, key=len, reverse=True):
        text = text.replace(s, MASK)
    return text


def redacted(obj, secrets: Iterable[str] = ()):
    """A copy of `obj` (a dataclass, dict, list or scalar, nested) fit to be written: every string with its URL
    credentials and the named `secrets` replaced by ***."""
    secrets = list(secrets)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        obj = dataclasses.asdict(obj)
    if isinstance(obj, str):
        return redact(redact_urls(obj), secrets)
    if isinstance(obj, dict):
        return {redacted(k, secrets) if isinstance(k, str) else k: redacted(v, secrets) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(redacted(v, secrets) for v in obj)
    return obj


def redacted_repr(cfg) -> str:
    """The dataclass repr of a Config, with URL credentials masked (for `__repr__` of Configs holding a URL)."""
    fields = ", ".join(f"{f.name}={getattr(cfg, f.name)!r}" for f in dataclasses.fields(cfg) if f.repr)
    return redact_urls(f"{type(cfg).__qualname__}({fields})")
