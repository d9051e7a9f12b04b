"""The package as installed (`pip install .`): pyproject.toml ships every package of mtt_jax and nothing
else, its dependency ranges hold the versions CI pins, its version is the one CITATION.cff gives, and a
config file loads by its path from any working directory."""

import os
import re
import subprocess
import sys
import tomllib

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def pyproject() -> dict:
    with open(os.path.join(ROOT, "pyproject.toml"), "rb") as f:
        return tomllib.load(f)


def test_every_package_of_mtt_jax_is_listed_and_nothing_else():
    listed = pyproject()["tool"]["setuptools"]["packages"]
    on_disk, without_init = [], []
    for folder, subfolders, files in os.walk(os.path.join(ROOT, "mtt_jax")):
        subfolders[:] = [d for d in subfolders if d != "__pycache__"]
        name = os.path.relpath(folder, ROOT).replace(os.sep, ".")
        if "__init__.py" in files:
            on_disk.append(name)
        elif any(f.endswith(".py") for f in files):
            without_init.append(name)  # setuptools would leave its modules out of the wheel
    assert not without_init, f"folders of modules without an __init__.py: {without_init}"
    assert sorted(listed) == sorted(on_disk), "pyproject.toml's [tool.setuptools] packages"


def test_dependency_ranges_hold_the_pinned_versions():
    """Every pin of requirements.txt (what CI installs) is a dependency or an extra's, in its range."""
    project = pyproject()["project"]
    declared = [Requirement(r) for r in project["dependencies"]]
    declared += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    ranges = {canonicalize_name(r.name): r for r in declared if r.name != project["name"]}
    with open(os.path.join(ROOT, "requirements.txt")) as f:
        pins = [Requirement(line.split("#")[0].strip()) for line in f if line.split("#")[0].strip()]
    assert len(pins) >= 15
    for pin in pins:
        (version,) = [s.version for s in pin.specifier]
        declared_as = ranges.get(canonicalize_name(pin.name))
        assert declared_as is not None, f"{pin.name} is pinned but not in pyproject.toml"
        assert declared_as.specifier.contains(version), f"{pin} is outside {declared_as}"
        assert pin.extras <= declared_as.extras, f"{pin} needs the extras {pin.extras}"
    assert set(project["optional-dependencies"]) >= {"tfds", "gcs", "tensorboard", "test"}


def test_metadata_agrees_with_the_citation_file():
    project = pyproject()["project"]
    with open(os.path.join(ROOT, "CITATION.cff")) as f:
        citation = yaml.safe_load(f)
    assert citation["cff-version"] == "1.2.0"
    assert str(citation["version"]) == project["version"]
    assert citation["license"] == project["license"] == "Apache-2.0"
    assert citation["authors"] == [{"name": "The mtt_jax authors"}]
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])
    with open(os.path.join(ROOT, "LICENSE")) as f:
        license_text = f.read()
    assert "Apache License" in license_text and "Version 2.0, January 2004" in license_text
    assert "Copyright 2026 The mtt_jax authors" in license_text


def test_a_config_file_loads_from_another_working_directory(tmp_path):
    """``python -m mtt_jax.main --config /checkout/configs/seqtasks.py:tiny`` run elsewhere, with only
    the package importable (as after ``pip install .``): the config and the sibling it imports
    (``from configs.default import base_config``) load, and the run goes on to its config check."""
    site = tmp_path / "site"
    site.mkdir()
    os.symlink(os.path.join(ROOT, "mtt_jax"), site / "mtt_jax")  # the package, without configs/ beside it
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {**os.environ, "PYTHONPATH": str(site)}
    config = os.path.join(ROOT, "configs", "seqtasks.py") + ":tiny"
    result = subprocess.run([sys.executable, "-m", "mtt_jax.main", f"--config={config}",
                             f"--workdir={tmp_path / 'run'}", "--config.total_steps=0"],
                            cwd=elsewhere, env=env, capture_output=True, text=True, timeout=120)
    # Refused by the config check, which runs on the loaded config: so the config file loaded.
    assert result.returncode == 2, result.stderr[-2000:]
    assert result.stderr.strip().splitlines()[-1] == "error: total_steps=0 must be a positive integer"
    assert not (tmp_path / "run").exists()
