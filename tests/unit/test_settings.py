"""Settings come from the Go provisioner's environment variable names; missing ones are named."""

from __future__ import annotations

import pytest

from gpu_provisioner.settings import Settings, SettingsError

REQUIRED = {
    "ARM_SUBSCRIPTION_ID": "sub", "ARM_RESOURCE_GROUP": "rg", "AZURE_CLUSTER_NAME": "kaito", "LOCATION": "eastus"
}


def test_required_settings_come_from_the_go_names(monkeypatch):
    for name, value in REQUIRED.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setenv("CLAIM_APIS", "nodeclaim")
    settings = Settings.load()
    assert (settings.subscription_id, settings.resource_group, settings.cluster_name, settings.location) == (
        "sub", "rg", "kaito", "eastus")
    assert settings.claim_apis == ["nodeclaim"]
    assert settings.arm_endpoint == "https://management.azure.com"


def test_missing_and_wrong_settings_are_each_named(monkeypatch):
    for name in REQUIRED:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AZURE_CLUSTER_NAME", "kaito")
    monkeypatch.setenv("CLAIM_APIS", "machine,pods")
    with pytest.raises(SettingsError) as error:
        Settings.load()
    message = str(error.value)
    for name in ("ARM_SUBSCRIPTION_ID", "ARM_RESOURCE_GROUP", "LOCATION", "CLAIM_APIS"):
        assert name in message
    assert "AZURE_CLUSTER_NAME" not in message
