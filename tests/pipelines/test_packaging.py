"""The distribution as a user installs it: its top-level packages, and the default run without extras.

A wheel is built from a copy of the sources (nothing is written into the
checkout) and installed with ``--no-deps`` into a fresh venv that sees the
already-installed dependencies through a ``.pth`` file, minus the ``local``
extra (aiohttp) and the checkout's own editable install (``pipelines_testlib``).
"""

from __future__ import annotations

import subprocess
import sys
import tarfile
import tomllib
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from pipelines_testlib import build_wheel, clean_env, copy_sources, venv_with_wheel

from pipelines._endpoint import LOCAL_EXTRA_MODULES

REPO_ROOT = Path(__file__).resolve().parents[2]
_SOURCES = ("pyproject.toml", "setup.py", "README.md", "sinks", "pipelines", "tinybird_emulator")
# What the fresh venv must not see from the test venv: the local extra.
_HIDDEN = ("aiohttp",)


def _run(args, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, timeout=180, env=clean_env(), **kwargs)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    return build_wheel(_SOURCES, tmp_path_factory.mktemp("wheel"))


@pytest.fixture(scope="module")
def fresh_python(wheel, tmp_path_factory) -> Path:
    """A new venv's interpreter with the wheel installed, no extras, and no aiohttp to be found."""
    return venv_with_wheel(wheel, tmp_path_factory.mktemp("venv"), hidden=_HIDDEN) / "bin" / "python"


def test_the_wheel_holds_exactly_three_top_level_packages(wheel):
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (record,) = [name for name in names if name.endswith(".dist-info/RECORD")]
        recorded = archive.read(record).decode("utf-8").splitlines()
    top_level = {line.split(",")[0].split("/")[0] for line in recorded if line}
    assert top_level - {record.split("/")[0]} == {"sinks", "pipelines", "tinybird_emulator"}
    assert {name.split("/")[0] for name in names} == top_level


def test_the_fresh_venv_has_the_wheel_and_not_the_local_extra(fresh_python, tmp_path):
    # From a directory outside the checkout: "-c" puts the working directory first on sys.path.
    probe = _run([str(fresh_python), "-c", "import aiohttp"], cwd=tmp_path)
    assert probe.returncode == 1 and "No module named 'aiohttp'" in probe.stderr
    where = _run([str(fresh_python), "-c", "import pipelines, sinks; print(pipelines.__file__, sinks.__file__)"],
                 cwd=tmp_path)
    assert where.returncode == 0, where.stderr
    assert str(REPO_ROOT) not in where.stdout and "site-packages" in where.stdout


def test_the_default_run_without_the_local_extra_prints_one_hint_line(fresh_python, tmp_path):
    result = _run([str(fresh_python), "-m", "pipelines.files_to_tinybird"], cwd=tmp_path)
    assert result.returncode == 2
    assert "Traceback" not in result.stdout + result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: without --api_url the job starts the local Events API server")
    assert "pip install 'beam-tinybird[local]'" in lines[0]
    assert not (tmp_path / "tinybird-local").exists()  # refused before anything started


def test_importing_the_pipelines_does_not_import_the_local_server(fresh_python, tmp_path):
    probe = _run([str(fresh_python), "-c",
                  "import sys, pipelines.files_to_tinybird, pipelines.replay_dead_letters, "
                  "pipelines.streaming_to_tinybird, sinks.tinybird; "
                  "print(sorted(m for m in sys.modules if m.startswith(('tinybird_emulator', 'aiohttp'))))"],
                 cwd=tmp_path)
    assert probe.returncode == 0, probe.stderr[-3000:]
    assert probe.stdout.strip() == "[]"


def test_local_extra_modules_are_the_local_extra():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    extra = {Requirement(r).name.replace("-", "_") for r in project["optional-dependencies"]["local"]}
    assert set(LOCAL_EXTRA_MODULES) == extra


def _gcp_extra_setuptools_floor() -> str:
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    for line in project["optional-dependencies"]["gcp"]:
        requirement = Requirement(line)
        if requirement.name == "setuptools":
            (floor,) = [spec.version for spec in requirement.specifier if spec.operator == ">="]
            return floor
    raise AssertionError("the gcp extra names no setuptools")


@pytest.mark.timeout(600)
@pytest.mark.parametrize("setuptools, builds", [("76.1.0", False), ("floor", True)])
def test_the_sdist_dataflow_stages_builds_with_the_setuptools_the_gcp_extra_brings(tmp_path, setuptools, builds):
    """``--setup_file``: Beam's Stager builds the sdist with the submitting environment's setuptools
    (``python -m build --no-isolation``, else ``setup.py sdist``), not the one [build-system] names.
    The gcp extra (what a Dataflow submitter installs) must bring one that reads pyproject.toml;
    the control, one version older, cannot."""
    if setuptools == "floor":  # the floor's own release line (77.0.0 was never published)
        floor = _gcp_extra_setuptools_floor()
        wanted = f"setuptools>={floor},<{int(floor.split('.')[0]) + 1}"
    else:
        wanted = f"setuptools=={setuptools}"
    source = copy_sources(_SOURCES, tmp_path / "source")
    venv = tmp_path / "venv"
    assert _run([sys.executable, "-m", "venv", "--without-pip", str(venv)]).returncode == 0
    python = str(venv / "bin" / "python")
    install = _run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", wanted])
    assert install.returncode == 0, install.stderr[-2000:]
    sdist = _run([python, "setup.py", "--quiet", "sdist", "--dist-dir", str(tmp_path / "dist")], cwd=source)
    if builds:
        assert sdist.returncode == 0, sdist.stderr[-2000:]
        (archive,) = (tmp_path / "dist").glob("beam_tinybird-*.tar.gz")
        with tarfile.open(archive) as tar:
            names = {name.split("/", 1)[1] for name in tar.getnames() if "/" in name}
        assert {"setup.py", "pyproject.toml", "pipelines/sample_data/events.ndjson",
                "sinks/tinybird/_transform.py"} <= names
    else:
        assert sdist.returncode != 0 and "project.license" in sdist.stderr + sdist.stdout
