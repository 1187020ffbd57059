"""die_with_parent: local processes die with the process that started them, also when it died before they could ask."""

from __future__ import annotations

import os
import subprocess

import pytest

from gpu_provisioner.devenv.controlplane import die_with_parent

EXIT_7 = ["sh", "-c", "exit 7"]


def test_a_child_whose_parent_lives_runs_its_program():
    assert subprocess.run(EXIT_7, preexec_fn=die_with_parent, check=False).returncode == 7


def test_a_child_whose_parent_died_before_it_asked_exits_without_running(monkeypatch: pytest.MonkeyPatch):
    # As the kernel shows it once the parent is gone: the child was handed to another process (init or a subreaper).
    monkeypatch.setattr(os, "getppid", lambda: 1)
    assert subprocess.run(EXIT_7, preexec_fn=die_with_parent, check=False).returncode == 1
