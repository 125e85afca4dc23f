"""The package structure, read from the import statements of every module under ``cmexp/``
(top-level and inside functions): packages sit on floors and import only from their own floor
or below, no two packages import each other, methods never import one another, and no module
outside a method's folder names that method's classes (the registry only holds strings)."""

from __future__ import annotations

import ast
import re
from collections import defaultdict
from pathlib import Path

import pytest

from cmexp import registry

ROOT = Path(__file__).resolve().parents[2] / "cmexp"

#: The floors, ground first (docs/architecture.md's package map draws the same).
FLOORS: list[set[str]] = [
    {"utils", "zoo", "registry"},  # torch-free: config checks, run folders, the registry
    {"nets", "diffusion", "losses"},  # the science, pure PyTorch
    {"interop", "data"},
    {"inference", "metrics"},  # everything that uses a trained model
    {"training", "callbacks"},  # shared training machinery
    {"methods"},  # one folder per training method
    {"train", "sample", "eval", "edit", "tau_search", "export", "compare"},  # entry points
]
FLOOR = {pkg: i for i, floor in enumerate(FLOORS) for pkg in floor}


def _package(module: str) -> str | None:
    """``cmexp.inference.plan`` -> ``inference``; ``cmexp.methods.edm.loss`` -> ``methods.edm``."""
    parts = module.split(".")
    if parts[0] != "cmexp" or len(parts) == 1:
        return None
    if parts[1] == "methods" and len(parts) > 2:
        return f"methods.{parts[2]}"
    return parts[1]


def _floor(pkg: str) -> int:
    return FLOOR[pkg.split(".")[0]]


def _imports() -> dict[str, set[tuple[str, str]]]:
    """package -> {(imported package, file)} for every import between packages."""
    edges: dict[str, set[tuple[str, str]]] = defaultdict(set)
    for file in ROOT.rglob("*.py"):
        parts = file.relative_to(ROOT.parent).with_suffix("").parts
        module = ".".join(p for p in parts if p != "__init__")
        src = _package(module) or "cmexp"
        for node in ast.walk(ast.parse(file.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
                if node.module == "cmexp":
                    names = [f"cmexp.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                dst = _package(name)
                if dst is not None and dst != src:
                    edges[src].add((dst, str(file.relative_to(ROOT.parent))))
    return edges


def test_every_package_has_a_floor() -> None:
    modules = (f.relative_to(ROOT.parent).with_suffix("").parts for f in ROOT.rglob("*.py"))
    found = {_package(".".join(p for p in parts if p != "__init__")) for parts in modules}
    missing = {p for p in found if p and p.split(".")[0] not in FLOOR}
    assert not missing, f"packages without a floor in FLOORS: {sorted(missing)}"


def test_imports_go_down_or_sideways_never_up() -> None:
    up = [
        f"{src} -> {dst} ({file})"
        for src, edges in _imports().items()
        if src != "cmexp"
        for dst, file in edges
        if _floor(dst) > _floor(src)
    ]
    assert not up, "imports that climb a floor:\n" + "\n".join(sorted(up))


def test_no_two_packages_import_each_other() -> None:
    edges = _imports()
    pairs = {
        tuple(sorted((src, dst)))
        for src, out in edges.items()
        for dst, _ in out
        if any(d == src for d, _ in edges.get(dst, ()))
    }
    assert not pairs, f"packages that import each other: {sorted(pairs)}"


def test_methods_do_not_import_each_other() -> None:
    cross = [
        f"{src} -> {dst} ({file})"
        for src, edges in _imports().items()
        if src.startswith("methods.")
        for dst, file in edges
        if dst.startswith("methods.")
    ]
    assert not cross, "\n".join(cross)


@pytest.mark.parametrize("kind", registry.kinds())
def test_only_a_methods_folder_names_its_classes(kind: str) -> None:
    """``grep`` for a method's LightningModule outside its folder finds nothing under cmexp/."""
    method = registry.method(kind)
    cls = method.module.rsplit(".", 1)[1]
    folder = ROOT.parent / Path(*method.package.split("."))
    word = re.compile(rf"\b{cls}\b")
    hits = [
        str(f.relative_to(ROOT.parent))
        for f in ROOT.rglob("*.py")
        if folder not in f.parents and word.search(f.read_text())
    ]
    assert not hits, f"{cls} is named outside {folder}: {hits}"
