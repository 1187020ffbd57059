"""structlog as JSON lines on stderr, one event a line, at the configured level.

Everything the process writes to stderr goes through one handler: structlog's own events, the standard
library's logging (Azure SDK, azure-identity and MSAL, urllib3, the Kubernetes client), Python warnings, and
exceptions nothing caught. Each line is redacted on the way out, so neither a client secret nor a token is
ever written, whoever logged it.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import sys
import threading
from collections.abc import Callable
from typing import Any, ParamSpec, TypeVar

import structlog
import typer

# Libraries that log through the standard library: warnings and errors always; their info only at debug.
THIRD_PARTY_LOGGERS = ("azure", "msal", "urllib3", "kubernetes")
# Variables whose values are secrets (DefaultAzureCredential's EnvironmentCredential reads them).
SECRET_VARIABLES = ("AZURE_CLIENT_SECRET", "AZURE_CLIENT_CERTIFICATE_PASSWORD", "AZURE_PASSWORD")
_REDACTED = "[REDACTED]"
_TOKEN_PATTERNS = (
    # A JWT (Entra ID's access and ID tokens, service-account tokens).
    re.compile(r"eyJ[\w-]{4,}\.[\w-]{4,}\.[\w-]*"),
    # An Authorization header's credentials.
    re.compile(r"(?i)(\b(?:bearer|basic)\s+)[\w.~+/=-]{8,}"),
    # A token or secret field, in a form body, a query string, a dict's repr or JSON (quotes JSON-escaped).
    re.compile(r"(?i)((?:access_token|refresh_token|id_token|client_secret|client_assertion|password)"
               r"(?:\\?[\"'])?\s*[:=]\s*(?:\\?[\"'])?)[^\"'\\&\s,}]+"),
)

P = ParamSpec("P")
R = TypeVar("R")


def redact(line: str) -> str:
    """`line` without the process's secrets or anything shaped like a token."""
    for name in SECRET_VARIABLES:
        secret = os.environ.get(name)
        if secret:
            line = line.replace(secret, _REDACTED)
    for pattern in _TOKEN_PATTERNS:
        line = pattern.sub(lambda match: (match.group(1) if match.groups() else "") + _REDACTED, line)
    return line


def _redact_rendered(_logger: Any, _method: str, rendered: str) -> str:
    return redact(rendered)


def configure_logging(level: str = "info", json: bool = True) -> None:
    numeric = logging.getLevelNamesMapping().get(level.upper())
    if numeric is None:
        raise ValueError(f"unknown log level {level!r}; use debug, info, warning or error")
    renderer = structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    stamped: list[Any] = [structlog.processors.add_log_level, structlog.processors.TimeStamper(fmt="iso", utc=True)]
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, *stamped,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        wrapper_class=structlog.make_filtering_bound_logger(numeric),
        logger_factory=structlog.stdlib.LoggerFactory(),
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(structlog.stdlib.ProcessorFormatter(
        # Records of other libraries: their logger's name says whose they are.
        foreign_pre_chain=[*stamped, structlog.stdlib.add_logger_name],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, renderer, _redact_rendered],
    ))
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(numeric)
    for name in THIRD_PARTY_LOGGERS:
        logging.getLogger(name).setLevel(max(numeric, logging.INFO if numeric <= logging.DEBUG else logging.WARNING))
    logging.captureWarnings(True)
    sys.excepthook = _log_uncaught
    threading.excepthook = lambda args: _log_uncaught(args.exc_type, args.exc_value, args.exc_traceback)


def _log_uncaught(exc_type: type[BaseException], exc_value: BaseException | None, traceback: Any) -> None:
    structlog.get_logger(__name__).critical(
        "uncaught exception", thread=threading.current_thread().name,
        exc_info=(exc_type, exc_value or exc_type(), traceback),
    )


def crash_logged(command: Callable[P, R]) -> Callable[P, R]:
    """Runs a command that logs as JSON: an exception it lets escape is one JSON line saying what stopped the
    process (not a traceback of many lines), and exit status 1."""

    @functools.wraps(command)
    def run(*args: P.args, **kwargs: P.kwargs) -> R:
        if not structlog.is_configured():
            configure_logging()
        try:
            return command(*args, **kwargs)
        except typer.Exit:  # the command chose its exit status, having said why
            raise
        except Exception as error:
            structlog.get_logger(__name__).critical(
                f"gpu-provisioner stopped: {type(error).__name__}: {error}", exc_info=True)
            raise SystemExit(1) from None

    return run
