"""Keep secrets out of every log line and message: the API key, and credentials inside a URL.

    secrets = url_secrets(base_url) + [api_key]
    redact("... Bearer sk-123 ...", secrets)        # -> "... Bearer *** ..."
    with redacting_logs(secrets):                  # every handler of every logger, for the run
        ...

A server can echo the `Authorization` header in an error body, and a base URL may carry a key
in its query (`...?api-key=KEY`) that the HTTP client prints in its request log. Messages are
redacted where they are made (`LLMCritic.redact`); `redacting_logs` is the net under that:
a filter on the log handlers that rewrites any record containing a secret, traceback included.
The redaction itself (`redact`, `url_secrets`, `redact_url(s)`, `redacted` for whole config dumps)
lives in `opsd.redact`, the one place every opsd writer and Config repr uses too.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterable, Iterator
from urllib.parse import parse_qsl, urlsplit, urlunsplit

from opsd.redact import MASK, MIN_SECRET_CHARS, redact, redact_url, redact_urls, redacted, url_secrets

__all__ = ["MASK", "MIN_SECRET_CHARS", "RedactingFilter", "redact", "redact_url", "redact_urls", "redacted",
           "redacting_logs", "split_query", "url_secrets"]


def split_query(url: str) -> tuple[str, dict[str, str]]:
    """(url without its query, {name: value} of the query): a key in the query is sent as a query
    parameter of every request instead of being glued into the path by the client."""
    parts = urlsplit(url)
    return urlunsplit(parts._replace(query="", fragment="")), dict(parse_qsl(parts.query))


class RedactingFilter(logging.Filter):
    """A handler filter that rewrites any record whose message or traceback holds a secret."""

    def __init__(self, secrets: Iterable[str]):
        super().__init__()
        self.secrets = [s for s in secrets if s and len(s) >= MIN_SECRET_CHARS]

    def filter(self, record: logging.LogRecord) -> bool:
        if not self.secrets:
            return True
        try:
            msg = record.getMessage()
        except Exception:  # a broken format string: keep the raw text
            msg = str(record.msg)
        if any(s in msg for s in self.secrets):
            record.msg, record.args = redact(msg, self.secrets), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text and any(s in record.exc_text for s in self.secrets):
            record.exc_text = redact(record.exc_text, self.secrets)
        return True


def _all_handlers() -> list[logging.Handler]:
    handlers = list(logging.getLogger().handlers)
    for logger in list(logging.Logger.manager.loggerDict.values()):
        handlers += getattr(logger, "handlers", [])
    if logging.lastResort is not None:
        handlers.append(logging.lastResort)
    return list(dict.fromkeys(handlers))


@contextlib.contextmanager
def redacting_logs(secrets: Iterable[str]) -> Iterator[None]:
    """Install a `RedactingFilter` on every log handler for the duration of the block."""
    f = RedactingFilter(secrets)
    handlers = _all_handlers() if f.secrets else []
    for h in handlers:
        h.addFilter(f)
    try:
        yield
    finally:
        for h in handlers:
            h.removeFilter(f)
