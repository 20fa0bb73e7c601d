"""Fixtures for backbone tests: the independent official re-implementations, loaded by file path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


def _load(name: str):
    path = Path(__file__).with_name(f"{name}.py")
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="session")
def official_biformer():
    return _load("official_biformer")


@pytest.fixture(scope="session")
def official_overlock():
    return _load("official_overlock")
