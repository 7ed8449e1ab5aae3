"""The repository layout that keeps `platform/` from shadowing the standard library."""

import subprocess
import sys
from pathlib import Path

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


def package_contents(package: Path) -> list[str]:
    """What a package's index must name: its modules (`name.py`) and subpackages (`name/`)."""
    modules = [f"{p.name}" for p in package.glob("*.py") if p.stem not in ("__init__", "__main__")]
    packages = [f"{p.name}/" for p in package.iterdir() if (p / "__init__.py").is_file()]
    return sorted(modules + packages)


def saeforge_packages() -> list[Path]:
    return sorted(p.parent for p in (REPO / "platform" / "saeforge").rglob("__init__.py"))


def test_every_package_index_names_its_modules():
    """Each folder's `__init__` docstring is its index: it names every module and subpackage."""
    import ast

    missing = {}
    for package in saeforge_packages():
        index = ast.get_docstring(ast.parse((package / "__init__.py").read_text())) or ""
        names = [n for n in package_contents(package) if n not in index]
        if names:
            missing[str(package.relative_to(REPO))] = names
    assert not missing, missing


def test_the_architecture_page_names_every_module():
    page = (REPO / "docs" / "architecture.md").read_text()
    missing = [
        f"{package.relative_to(REPO)}/{name}"
        for package in saeforge_packages()
        for name in package_contents(package)
        if name not in page
    ]
    missing += [name for name in ("base.py", "common.py") if name not in page]
    assert not missing, missing


def test_no_function_in_jobs_is_longer_than_sixty_lines():
    """A driver reads as a list of steps: one job per function."""
    import ast

    long = []
    for path in sorted((REPO / "platform" / "saeforge" / "jobs").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.relative_to(REPO)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_ci_fails_where_an_optional_dependency_is_missing(monkeypatch):
    """SAELens and Chromium tests skip on a developer's machine without them, and fail under
    CI=true, where they must run."""
    import pytest

    from conftest import require

    require(True, "anything")  # present: nothing happens
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require(False, "SAELens")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(pytest.fail.Exception, match="CI=true"):
        require(False, "SAELens")
