"""The repository layout that keeps `platform/` from shadowing the standard library."""

import subprocess
import sys

from conftest import REPO


def test_stdlib_platform_importable_from_repo_root():
    code = "import platform, uuid; print(platform.system()); print(platform.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, check=True).stdout
    assert out.splitlines()[0] == "Linux"
    assert "/platform/" not in out.splitlines()[1].replace("\\", "/").split("lib", 1)[0]


def test_platform_is_a_source_root_not_a_package():
    assert not (REPO / "platform" / "__init__.py").exists()
    assert (REPO / "platform" / "saeforge" / "__init__.py").exists()


def test_every_variant_module_is_registered():
    import variants

    modules = {p.stem for p in (REPO / "variants").glob("*.py") if p.stem not in ("__init__", "base", "common")}
    assert modules == set(variants.names())
