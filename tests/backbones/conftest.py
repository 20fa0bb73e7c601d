"""Fixtures for backbone tests: the independent official re-implementation, loaded by file path."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def official_biformer():
    path = Path(__file__).with_name("official_biformer.py")
    spec = importlib.util.spec_from_file_location("official_biformer", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
