"""Simulator scenarios: presets by name, fields from AKS_SIM_* for a whole run, overrides from Python."""

from __future__ import annotations

import pytest

from gpu_provisioner.sim import PRESETS, Scenario


def test_presets_environment_and_overrides(monkeypatch):
    monkeypatch.setenv("AKS_SIM_SEED", "9")
    monkeypatch.setenv("AKS_SIM_CREATE_DELAY_S", "7.5")
    throttled = Scenario.named("throttled", retry_after_s=4)
    assert (throttled.throttle_rate, throttled.retry_after_s) == (0.3, 4)
    assert (throttled.seed, throttled.create_delay_s) == (9, 7.5)
    assert Scenario.named("quota-exhausted").vcpu_quota["standardNCSv3Family"] == 0
    assert {"quota-exhausted", "sku-unavailable", "throttled", "node-never-ready"} <= set(PRESETS)


def test_unknown_scenario_is_refused_by_name():
    with pytest.raises(ValueError, match="unknown scenario 'bogus'"):
        Scenario.named("bogus")
