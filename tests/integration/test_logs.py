"""What a log pipeline reads from a running controller: JSON objects only, one a line, and never a secret or
a token, whoever logged (azure-identity, the Azure SDK, urllib3, the Kubernetes client)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from gpu_provisioner.api.claims import NODECLAIM
from tests.integration.harness import CLEAN_ENV, kaito_claim, wait_for


def json_lines(log: Path) -> list[dict]:
    lines = log.read_text().splitlines()
    assert lines
    parsed = []
    for line in lines:
        try:
            parsed.append(json.loads(line))
        except json.JSONDecodeError:
            raise AssertionError(f"not a JSON line: {line!r}") from None
    return parsed


def test_a_wrong_client_secret_is_logged_as_json_lines_without_the_secret(
    claims, start_sim, controller_process, unique_name, tmp_path
):
    sim = start_sim()
    wrong_secret = "wrong-" + sim.client_secret
    controller_process(sim, AZURE_CLIENT_SECRET=wrong_secret)
    claims.create(NODECLAIM, kaito_claim(NODECLAIM, unique_name))
    wait_for("three refused logins", lambda: sim.count_requests("token", 401) >= 3, timeout_s=60)
    claims.wait_condition(NODECLAIM, unique_name, NODECLAIM.launched, "Unknown", reason="AccessDenied")
    log = tmp_path / "controller-0.log"
    lines = json_lines(log)
    text = log.read_text()
    assert wrong_secret not in text and sim.client_secret not in text
    # azure-identity's own account of the failure is there, as JSON, under its logger's name.
    identity = [line for line in lines if line.get("logger", "").startswith("azure.identity")]
    assert identity and all({"level", "timestamp", "event"} <= line.keys() for line in identity)
    assert any("invalid_client" in line["event"] or "AADSTS7000215" in line["event"] for line in identity)


def test_a_lifecycle_at_debug_level_logs_json_lines_without_secret_or_token(
    claims, start_sim, controller_process, unique_name, tmp_path
):
    sim = start_sim()
    controller_process(sim, LOG_LEVEL="debug")
    claims.create_ready(NODECLAIM, kaito_claim(NODECLAIM, unique_name))
    claims.delete(NODECLAIM, unique_name)
    claims.wait_gone(NODECLAIM, unique_name)
    log = tmp_path / "controller-0.log"
    lines = json_lines(log)
    assert any(line.get("logger", "").startswith("azure.") for line in lines)  # the SDK's request log is in
    text = log.read_text()
    assert sim.issued_tokens() and not any(token in text for token in sim.issued_tokens())
    assert sim.client_secret not in text


def test_a_start_up_failure_is_one_json_line_naming_it(tmp_path):
    missing = subprocess.run([sys.executable, "-m", "gpu_provisioner", "run"], capture_output=True, text=True,
                             timeout=60, env=CLEAN_ENV)
    assert missing.returncode == 2
    (line,) = missing.stderr.splitlines()
    failure = json.loads(line)
    assert failure["event"].startswith("gpu-provisioner cannot start") and failure["level"] == "error"
    assert "ARM_SUBSCRIPTION_ID: is not set" in failure["problems"]

    broken = tmp_path / "kubeconfig"
    broken.write_text("apiVersion: v1\nkind: Config\n")
    crashed = subprocess.run([sys.executable, "-m", "gpu_provisioner", "run"], capture_output=True, text=True,
                             timeout=60, env={**CLEAN_ENV, "ARM_SUBSCRIPTION_ID": "s", "ARM_RESOURCE_GROUP": "r",
                                              "AZURE_CLUSTER_NAME": "c", "LOCATION": "l", "KUBECONFIG": str(broken)})
    assert crashed.returncode == 1
    lines = [json.loads(line) for line in crashed.stderr.splitlines()]
    assert lines[-1]["level"] == "critical"
    assert lines[-1]["event"].startswith("gpu-provisioner stopped: ConfigException")
