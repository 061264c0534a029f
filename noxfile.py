"""The supported range, run: the built wheel on every Beam and Python that pyproject.toml admits.

``./dev matrix`` runs it (CI too). The wheel is built once; each cell is a
clean venv that holds the wheel, never the checkout, and runs the sink's tests
and the files job end to end from a copy of ``tests/`` outside the checkout:

- the floor of the Beam range, the default environment's Beam (the version the
  Dockerfiles pin, from ``constraints.txt``, with every other version locked
  too) and the newest Beam on PyPI, each on Python 3.11;
- the newest Beam on each of Python 3.12 and 3.13.

The floor and default-Beam cells differ from the default environment in Beam
alone, so they run the sink's test files that use Beam; the newest cells run
them all.

The newest cells ignore the lock and the range's ceiling: they are the canary.
A new Beam that breaks the sink fails here the day it is on PyPI, and one that
passes is reported as ready for the ceiling to be raised.
"""

from __future__ import annotations

import os
import re
import shutil
import tomllib
from pathlib import Path

import nox
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parent
nox.options.default_venv_backend = "uv"
nox.options.sessions = ["matrix"]
# A supported Python the machine lacks is reported by ./dev matrix as NOT RUN, never passed over quietly.
nox.options.error_on_missing_interpreters = False

_PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
(_BEAM_RANGE,) = [Requirement(r).specifier for r in _PROJECT["dependencies"] if Requirement(r).name == "apache-beam"]
# Every extra of apache-beam the project asks for somewhere (an override replaces them all).
_BEAM_EXTRAS = sorted({extra for group in [_PROJECT["dependencies"], *_PROJECT["optional-dependencies"].values()]
                       for r in map(Requirement, group) if r.name == "apache-beam" for extra in r.extras})
FLOOR = min(s.version for s in _BEAM_RANGE if s.operator == ">=")
PINNED = re.search(r"^apache-beam==(\S+)$", (ROOT / "constraints.txt").read_text(), re.MULTILINE)[1]  # type: ignore[index]
NEWEST = "newest"

CELLS = [
    ("3.11", FLOOR),
    ("3.11", PINNED),
    ("3.11", NEWEST),
    ("3.12", NEWEST),
    ("3.13", NEWEST),
]

# What every cell runs: the sink's tests (20,000 rows in global and fixed windows among
# them) and the files job on the sample data, on every in-process runner. The peak-memory
# test of the transport is left to the default suite: it measures the HTTP stack, not Beam.
TESTS = [
    "tests/sink",
    "tests/pipelines/test_files_pipeline.py::test_sample_data_on_every_runner",
    "--deselect",
    "tests/sink/test_hostile_server.py::test_huge_endless_and_bomb_bodies_keep_peak_memory_within_64_mib_of_a_good_run",
]
# The README's Dataflow set-up resolves the newest Beam: its streaming job on the Pub/Sub emulator,
# every message stored across a restart on the same subscription. The job's other options (an
# input topic, a data source per field) and the latency benchmark (benchmarks/ is not in the
# wheel) are left to the default suite: they take two minutes more and read Pub/Sub the same way.
STREAMING_TESTS = [
    "tests/pipelines/test_streaming_pubsub.py::test_json_ndjson_bad_messages_event_times_and_a_restart_on_the_same_subscription",
]

# pytest-xdist workers per cell (see matrix()).
WORKERS = 2

_wheel: Path | None = None


def _built_wheel(session: nox.Session) -> Path:
    """The project's wheel, built once per run into .nox/wheel (outside the package tree), or MATRIX_WHEEL."""
    global _wheel
    if _wheel is None and os.environ.get("MATRIX_WHEEL"):
        _wheel = Path(os.environ["MATRIX_WHEEL"])  # built once by scripts/matrix.py for every cell
    if _wheel is None:
        out = ROOT / ".nox" / "wheel"
        shutil.rmtree(out, ignore_errors=True)
        session.run("uv", "build", "--wheel", "--out-dir", str(out), str(ROOT), external=True, silent=True)
        (_wheel,) = out.glob("beam_tinybird-*.whl")
    return _wheel


def _beam_only(args: list[str], tmp: Path) -> list[str]:
    """``args`` with each test folder narrowed to its files that use Beam.

    For the cells that differ from the default environment only in Beam (same Python,
    same code): a file that never imports Beam (the HTTP client, the retry policy, the
    limiter) checks nothing there that the full suite does not.
    """
    narrowed = []
    for arg in args:
        folder = tmp / arg
        if folder.is_dir():
            narrowed += sorted(str(f.relative_to(tmp)) for f in folder.glob("test_*.py")
                               if "apache_beam" in f.read_text(encoding="utf-8"))
        else:
            narrowed.append(arg)
    return narrowed


def _newest_beam(session: nox.Session, tmp: Path) -> str:
    """The newest apache-beam on the package index for this cell's Python."""
    wanted = tmp / "newest.in"
    wanted.write_text("apache-beam\n")
    compiled = session.run("uv", "pip", "compile", "--quiet", "--no-header", "--python-version", str(session.python),
                           str(wanted), external=True, silent=True)
    return re.search(r"^apache-beam==(\S+)$", str(compiled), re.MULTILINE)[1]  # type: ignore[index]


@nox.session
@nox.parametrize(
    ("python", "beam"), CELLS, ids=[f"py{python}-beam-{beam}" for python, beam in CELLS])
def matrix(session: nox.Session, beam: str) -> None:
    wheel = _built_wheel(session)
    requirement = f"{wheel}[test]"
    tmp = Path(session.create_tmp()).resolve()  # absolute: the session changes into it
    if beam == NEWEST:
        # No lock, and the range's ceiling overridden: the newest release whatever pyproject says.
        overrides = tmp / "overrides.txt"
        overrides.write_text(f"apache-beam[{','.join(_BEAM_EXTRAS)}]>={FLOOR}\n")
        session.install(requirement, "--override", str(overrides))
    elif beam == PINNED:
        session.install(requirement, "-c", str(ROOT / "constraints.txt"))
    else:
        pin = tmp / "beam.txt"
        pin.write_text(f"apache-beam=={beam}\n")
        session.install(requirement, "-c", str(pin))
    installed = session.run("python", "-c", "import apache_beam; print(apache_beam.__version__)", silent=True)
    version = str(installed).strip().splitlines()[-1]
    expected = _newest_beam(session, tmp) if beam == NEWEST else beam
    session.log(f"cell: Python {session.python}, Beam {version} ({beam})")
    if Version(version) != Version(expected):
        # A cell that quietly runs another Beam than its name says checks nothing it claims to.
        session.error(f"this cell is for Beam {expected}, but installing the wheel's test extras gave {version}: "
                      "one of the extras' bounds holds Beam back")
    # The tests from a copy outside the checkout, so that every import comes from the wheel
    # (with the README, whose examples some of them run).
    tests = tmp / "tests"
    shutil.rmtree(tests, ignore_errors=True)
    shutil.copytree(ROOT / "tests", tests, ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "README.md", tmp / "README.md")
    session.chdir(tmp)
    extra = STREAMING_TESTS if beam == NEWEST and session.python == "3.11" else []
    tests_to_run = TESTS if beam == NEWEST else _beam_only(TESTS, tmp)
    session.run("python", "-c", "import sinks, sys; assert 'site-packages' in sinks.__file__, sinks.__file__",
                silent=True)
    try:
        # --rootdir: node ids (and --deselect) are relative to the cell's folder, not to tests/.
        # Two workers (pytest-xdist), and ./dev matrix runs two cells at once: most tests wait on
        # servers, retries and deadlines more than they compute; every test is written to hold on
        # a busy machine (tests/shared_testlib.py, BUSY_MACHINE_SLACK_SECS). The streaming job's
        # test goes first: its minute runs beside the rest, not after them.
        session.run("python", "-m", "pytest", "-q", "-p", "no:cacheprovider", "--rootdir", str(tmp),
                    "-n", str(WORKERS), "--dist", "worksteal", *extra, *tests_to_run)
    except nox.command.CommandFailed:
        if beam == NEWEST:
            session.error(
                f"Beam {version}, the newest release on PyPI, breaks the sink on Python {session.python}: "
                "users of that Beam are affected; fix the sink before raising the range's ceiling")
        raise
    if beam == NEWEST and Version(version) not in _BEAM_RANGE:
        session.warn(
            f"Beam {version} is out and passes, but pyproject.toml admits {_BEAM_RANGE}: raise the ceiling "
            "(and `./dev lock` to move the default environment)")
