"""Pinned and forward-compatible dependencies: every declared dependency has an upper bound, the lock satisfies
every declared range, every install path uses the lock, and the declared license ships."""

from __future__ import annotations

import tomllib

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import REPO

PYPROJECTS = ["shared/protocol", "shared/runtime", "server", "client"]


def declared() -> list[tuple[str, Requirement]]:
    out = []
    for folder in PYPROJECTS:
        project = tomllib.loads((REPO / folder / "pyproject.toml").read_text())["project"]
        extras = [dep for deps in project.get("optional-dependencies", {}).values() for dep in deps]
        out += [(folder, Requirement(dep)) for dep in project["dependencies"] + extras]
    return out


def locked() -> dict[str, Version]:
    pins = {}
    for line in (REPO / "requirements.lock").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, _, version = line.partition("==")
            pins[canonicalize_name(name)] = Version(version)
    return pins


@pytest.mark.parametrize(("folder", "requirement"), declared(), ids=lambda v: str(v))
def test_every_dependency_has_an_upper_bound_and_the_lock_satisfies_it(folder, requirement):
    operators = {spec.operator for spec in requirement.specifier}
    assert operators & {"<", "<=", "==", "~="}, f"{folder}: {requirement} has no upper bound"
    pinned = locked().get(canonicalize_name(requirement.name))
    if pinned is not None:  # ours (lmaas-*) and torch are installed from the tree / pinned by the Makefile
        assert requirement.specifier.contains(pinned, prereleases=True), f"{folder}: lock {pinned} !~ {requirement}"


def test_make_and_both_images_install_from_the_lock():
    assert "-c requirements.lock" in (REPO / "Makefile").read_text()
    for image in ("server", "client"):
        dockerfile = (REPO / "docker" / f"{image}.Dockerfile").read_text()
        assert "COPY requirements.lock" in dockerfile and "-c requirements.lock" in dockerfile, image


def test_the_declared_license_ships_and_can_be_built():
    assert "Apache License" in (REPO / "LICENSE").read_text().splitlines()[0]
    for folder in PYPROJECTS:
        config = tomllib.loads((REPO / folder / "pyproject.toml").read_text())
        assert config["project"]["license"] == "Apache-2.0"
        setuptools = next(Requirement(r) for r in config["build-system"]["requires"] if r.startswith("setuptools"))
        assert setuptools.specifier.contains("77") and not setuptools.specifier.contains("76"), folder
