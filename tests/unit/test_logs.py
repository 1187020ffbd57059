"""Every line on stderr is one JSON object without secrets, whoever logged it."""

from __future__ import annotations

import json
import logging
import sys
import threading
import warnings

import pytest
import structlog

from gpu_provisioner.logs import configure_logging, redact

JWT = "eyJhbGciOiJSUzI1NiJ9.eyJzdWIiOiJjb250cm9sbGVyIn0.c2lnbmF0dXJl"


@pytest.fixture
def json_stderr(capsys):
    """Logging configured on the test's stderr (within the test: capture swaps stderr between phases); the
    lines it got, parsed."""

    def lines() -> list[dict]:
        return [json.loads(line) for line in capsys.readouterr().err.splitlines()]

    yield lines
    logging.getLogger().handlers.clear()
    logging.captureWarnings(False)
    sys.excepthook, threading.excepthook = sys.__excepthook__, threading.__excepthook__
    structlog.reset_defaults()


@pytest.mark.parametrize("text", [
    f"Authorization: Bearer {JWT}", "Authorization: Bearer s3cr3t-opaque-token-value",
    'form client_secret=s3cr3t-opaque-token-value&grant_type=client_credentials',
    '{"access_token": "s3cr3t-opaque-token-value", "expires_in": 3599}',
    "{'refresh_token': 's3cr3t-opaque-token-value'}", f"token {JWT} expired",
])
def test_tokens_and_secret_fields_are_redacted(text):
    redacted = redact(text)
    assert "s3cr3t" not in redacted and JWT not in redacted and "[REDACTED]" in redacted


def test_the_configured_client_secret_is_redacted_wherever_it_appears(monkeypatch):
    monkeypatch.setenv("AZURE_CLIENT_SECRET", "plain~secret.value")
    assert redact("login with plain~secret.value failed") == "login with [REDACTED] failed"


def test_standard_library_logs_warnings_and_errors_are_json_lines(json_stderr):
    configure_logging("info")
    logging.getLogger("azure.identity").warning("DefaultAzureCredential failed.\nAttempted credentials:\n\tBearer %s",
                                                JWT)
    logging.getLogger("azure.core.pipeline").info("Request URL: ...")  # the SDK's request log waits for debug
    warnings.warn("a deprecation", DeprecationWarning, stacklevel=1)
    structlog.get_logger("gpu_provisioner.test").info("ours", claim="nodeclaims/x")
    try:
        raise RuntimeError("boom")
    except RuntimeError:
        logging.getLogger("kubernetes.client").exception("failed")
    identity, warning, ours, failed = json_stderr()
    assert identity["logger"] == "azure.identity" and identity["level"] == "warning"
    assert "Attempted credentials" in identity["event"] and JWT not in identity["event"]
    assert warning["logger"] == "py.warnings" and "a deprecation" in warning["event"]
    assert ours["event"] == "ours" and ours["claim"] == "nodeclaims/x"
    assert failed["level"] == "error" and "RuntimeError: boom" in failed["exception"]
