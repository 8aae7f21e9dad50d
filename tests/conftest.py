"""Shared fixtures: a clean AUTOGLM_* environment and settings rooted in a temporary directory."""

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch loads; see the Makefile

import pytest  # noqa: E402

from autoglm.config import load_settings  # noqa: E402


@pytest.fixture(autouse=True)
def _clean_autoglm_env(monkeypatch):
    for var in list(os.environ):
        if var.startswith("AUTOGLM_"):
            monkeypatch.delenv(var)


@pytest.fixture
def settings_in(tmp_path):
    """Settings whose run root and data cache live in tmp_path; extra overrides as arguments."""

    def make(*overrides, config=None):
        base = [f"run.root='{tmp_path / 'runs'}'", f"run.cache_dir='{tmp_path / 'cache'}'"]
        return load_settings(config, base + list(overrides))

    return make
