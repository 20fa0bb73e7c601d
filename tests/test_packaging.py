"""Packaging and name safety: only `vzoo` is installed at top level; the repo-root folders never
shadow Hugging Face's `kernels` package; every subpackage is listed in pyproject.toml."""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MAPPED = {"vzoo": "vzoo", "kernels": "vzoo.kernels", "backbones": "vzoo.backbones", "pipelines": "vzoo.pipelines"}


def test_every_package_folder_is_listed_in_pyproject():
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    assert {k: v for k, v in cfg["package-dir"].items()} == {v: k for k, v in MAPPED.items()}
    found = set()
    for folder, name in MAPPED.items():
        for init in (ROOT / folder).rglob("__init__.py"):
            rel = init.parent.relative_to(ROOT / folder)
            found.add(".".join([name, *rel.parts]))
    assert found == set(cfg["packages"]), f"unlisted: {found - set(cfg['packages'])}"


def test_layout_rules_for_pytest():
    assert not (ROOT / "conftest.py").exists()
    assert not (ROOT / "tests" / "__init__.py").exists()
    cfg = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert "--import-mode=importlib" in cfg["addopts"]
    assert "pythonpath" not in cfg


def _run(code: str, cwd: Path) -> str:
    done = subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_transformers_kernels_check_is_false_from_the_repo_root():
    code = (
        "import importlib.metadata\n"
        "from transformers.utils import is_kernels_available\n"
        "try:\n    importlib.metadata.version('kernels'); real = True\n"
        "except importlib.metadata.PackageNotFoundError:\n    real = False\n"
        "print(is_kernels_available(), real)\n"
    )
    # `python -c` puts the repo root first on sys.path, the worst case: transformers then finds the
    # folder kernels/ and imports it to read a version. It must answer False, not raise.
    available, real = _run(code, ROOT).splitlines()[-1].split()
    assert available == real


def test_pytest_does_not_put_the_repo_root_on_sys_path():
    import importlib.util

    spec = importlib.util.find_spec("kernels")
    assert spec is None or ROOT not in Path(spec.origin or "").resolve().parents


def test_vzoo_kernels_imports_from_another_folder(tmp_path):
    out = _run("import vzoo.kernels as k, vzoo; print(k.__name__, k.__file__)", tmp_path)
    name, path = out.split()
    assert name == "vzoo.kernels"
    assert Path(path).resolve().parent == (ROOT / "kernels").resolve() or "site-packages" in path



def test_import_vzoo_kernels_stays_light(tmp_path):  # a fresh interpreter
    heavy = "('timm', 'diffusers', 'transformers', 'torchvision', 'vzoo.backbones', 'vzoo.lm')"
    loaded = _run(f"import sys, vzoo.kernels, vzoo; print([m for m in {heavy} if m in sys.modules])", tmp_path)
    assert loaded == "[]"


@pytest.mark.parametrize("order", [
    "import vzoo, timm", "import timm, vzoo", "import vzoo; from vzoo import ContMix; import timm",
    # a probe for timm before the import (transformers' availability checks do this) must not disarm the hook
    "import vzoo, importlib.util; importlib.util.find_spec('timm'); import timm",
])
def test_import_vzoo_registers_the_timm_models_whatever_the_order(order, tmp_path):
    assert _run(f"{order}; print(timm.is_model('biformer_tiny'), timm.is_model('overlock_xt'))", tmp_path) == "True True"


def test_lazy_attributes_resolve_and_unknown_ones_raise(tmp_path):
    out = _run("import vzoo; print(vzoo.ContMix.__module__, vzoo.VMoBAConfig.__module__, 'ContMix' in vzoo.__all__)\n"
                 "try:\n    vzoo.NoSuchThing\nexcept AttributeError as e:\n    print('AttributeError', e)", tmp_path)
    assert out.splitlines() == ["vzoo.overlock vzoo.vmoba True", "AttributeError module 'vzoo' has no attribute 'NoSuchThing'"]


def test_tasks_find_vzoo_models_when_timm_came_in_with_a_vzoo_module(tmp_path):
    """``import vzoo.overlock`` imports timm while a vzoo module initialises, so the import hook cannot
    register vzoo's timm models then; the module registers them as its last line (``vzoo bench --quick``
    failed with "Unknown model (biformer_tiny)" before)."""
    code = (
        "import vzoo.overlock, timm\n"
        "from vzoo.tasks.reid import ReIDModel\n"
        "m = ReIDModel('biformer_tiny', num_classes=3)\n"
        "print(type(m.backbone).__name__)\n"
    )
    assert _run(code, tmp_path) == "BiFormer"
