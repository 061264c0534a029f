"""The worker image recipe (workers/Dockerfile): Beam in step with the project, only production code in it.

Docker cannot run here: these checks read the Dockerfile. That the package it
installs (a wheel built from the same sources) runs as a worker pool is shown by
tests/pipelines/test_external_workers.py.
"""

from __future__ import annotations

import ast
import re
import shlex
import tomllib
from pathlib import Path

import apache_beam
import pytest
from apache_beam.options.pipeline_options import FlinkRunnerOptions, PipelineOptions, StandardOptions
from apache_beam.runners.portability.flink_runner import FlinkRunner
from apache_beam.runners.portability.portable_runner import PortableRunner
from apache_beam.transforms.environments import python_sdk_dependencies
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from pipelines._options import SinkConfig
from pipelines.files_to_tinybird import FilesToTinybirdOptions

REPO_ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = REPO_ROOT / "workers" / "Dockerfile"
SDK_IMAGE = "apache/beam_python3.11_sdk"
IMAGE = "registry.example.com/beam-tinybird-worker:0.1.0"


def _text() -> str:
    return DOCKERFILE.read_text(encoding="utf-8")


def _instructions() -> list[str]:
    """Instructions with their continuation lines joined, comments left out."""
    joined = re.sub(r"\\\n\s*", " ", _text())
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def _project() -> dict:
    return tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def _beam_version_arg() -> Version:
    (default,) = [line.split("=", 1)[1] for line in _instructions() if line.startswith("ARG BEAM_VERSION=")]
    return Version(default)


def _constraints_pin() -> Version:
    lines = [line.strip() for line in (REPO_ROOT / "constraints.txt").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    (beam,) = [Requirement(line) for line in lines if Requirement(line).name == "apache-beam"]
    (specifier,) = list(beam.specifier)
    assert specifier.operator == "=="
    return Version(specifier.version)


def test_beam_version_is_the_projects():
    version = _beam_version_arg()
    project = _project()["project"]
    ranges = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["gcp"]
              if Requirement(r).name == "apache-beam"]
    assert len(ranges) == 2
    assert all(version in requirement.specifier for requirement in ranges)
    # The Flex Templates' pin and the version the tests ran with: one Beam everywhere.
    assert version == _constraints_pin() == Version(apache_beam.__version__)


def test_both_stages_are_the_sdk_image_of_that_version():
    froms = [line for line in _instructions() if line.startswith("FROM ")]
    assert froms == [f"FROM {SDK_IMAGE}:${{BEAM_VERSION}} AS wheel", f"FROM {SDK_IMAGE}:${{BEAM_VERSION}}"]
    assert _instructions()[0].startswith("ARG BEAM_VERSION=")  # before FROM: usable in both
    assert "ARG BEAM_VERSION" in _instructions()  # and declared again inside the last stage
    assert Version("3.11") in SpecifierSet(_project()["project"]["requires-python"])
    # The SDK image's entrypoint (its boot program) stays: it is what serves both
    # the DOCKER contract and --worker_pool.
    assert not [line for line in _instructions() if line.startswith(("ENTRYPOINT", "CMD"))]


def _production_packages() -> set[str]:
    """The project's top-level packages, less the local server (a test tool)."""
    include = _project()["tool"]["setuptools"]["packages"]["find"]["include"]
    return {pattern.rstrip("*") for pattern in include} - {"tinybird_emulator"}


def test_it_copies_only_what_production_runs():
    sources = [source for line in _instructions() if line.startswith("COPY ") and "--from" not in line
               for source in line.split()[1:-1]]
    build_files = {"pyproject.toml", "setup.py", _project()["project"]["readme"]}
    assert set(sources) == build_files | _production_packages() == build_files | {"sinks", "pipelines"}
    assert all((REPO_ROOT / source).exists() for source in sources)
    # The worker-pool test builds its wheel from the same files.
    test_module = ast.parse((REPO_ROOT / "tests" / "pipelines" / "test_external_workers.py").read_text())
    (image_sources,) = [ast.literal_eval(node.value) for node in test_module.body
                        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "IMAGE_SOURCES"]
    assert set(image_sources) == set(sources)


def test_it_installs_the_wheel_with_the_gcp_extra_and_keeps_beam():
    instructions = _instructions()
    assert "RUN pip wheel --no-cache-dir --no-deps --wheel-dir /wheels ." in instructions
    (install,) = [line for line in instructions if " pip install " in line]
    assert install.startswith("RUN --mount=type=bind,from=wheel,source=/wheels,target=/tmp/wheels ")
    # What the SDK image holds (Beam and its pins) constrains the install: added to, never changed.
    assert "pip list --format=freeze > /tmp/image-packages.txt" in install
    assert ('pip install --no-cache-dir -c /tmp/image-packages.txt "$(ls /tmp/wheels/beam_tinybird-*.whl)[gcp]"'
            in install)
    assert not re.search(r"\[(local|test|lint)\]|tinybird_emulator|aiohttp| -e ", install)
    assert "import apache_beam, sinks.tinybird, pipelines.files_to_tinybird;" in install
    assert "assert apache_beam.__version__ == '${BEAM_VERSION}'" in install


def test_docker_environment_flags_of_the_readme_name_the_image():
    """Beam's portable runners take the image from --environment_config; --sdk_container_image
    (Dataflow's flag) leaves them on Beam's own SDK image, which lacks this package."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    assert "--environment_type=DOCKER --environment_config=$WORKER_IMAGE" in readme
    runner = PortableRunner()
    chosen = runner.default_environment(
        PipelineOptions(["--environment_type=DOCKER", f"--environment_config={IMAGE}"]))
    assert chosen.container_image == IMAGE
    ignored = runner.default_environment(
        PipelineOptions(["--environment_type=DOCKER", f"--sdk_container_image={IMAGE}"]))
    assert ignored.container_image == f"{SDK_IMAGE}:{apache_beam.__version__}"


# The shell variables of the README's Flink commands, as a user would set them.
_README_VARS = {"FLINK_MASTER": "flink-jobmanager:8081", "FLINK_VERSION": "1.20", "WORKER_IMAGE": IMAGE,
                "PROJECT": "my-project"}


def _readme_flink_commands() -> list[list[str]]:
    """The README's Flink commands, as argv lists (continuation lines joined, variables set)."""
    readme = (REPO_ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```sh\n(.*?)```", readme, re.DOTALL)
    commands = []
    for block in blocks:
        text = re.sub(r"\\\n\s*", " ", block)
        for line in text.splitlines():
            if "--runner=FlinkRunner" in line and line.strip().startswith("python -m pipelines.files_to_tinybird"):
                expanded = re.sub(r"\$(\w+)", lambda m: _README_VARS[m.group(1)], line)
                commands.append(shlex.split(expanded)[3:])
    return commands


@pytest.mark.parametrize("environment_type", ["EXTERNAL", "DOCKER"])
def test_readme_flink_commands_are_complete_and_valid(environment_type):
    (argv,) = [c for c in _readme_flink_commands() if f"--environment_type={environment_type}" in c]
    options = FilesToTinybirdOptions(argv)
    unknown = set(options.get_all_options(retain_unknown_options=True)) - set(options.get_all_options())
    assert not unknown, f"flags no Beam or pipeline option takes: {unknown}"
    flink = options.view_as(FlinkRunnerOptions)
    assert options.view_as(StandardOptions).runner == "FlinkRunner"
    assert flink.flink_master == "flink-jobmanager:8081" and flink.flink_version in FlinkRunnerOptions.PUBLISHED_FLINK_VERSIONS
    config = SinkConfig.from_options(options)
    assert not config.embedded and config.num_shards >= flink.parallelism > 1
    assert config.token is None  # never on the command line
    assert options.input.startswith("gs://") and config.dead_letter_path.startswith("gs://")
    environment = FlinkRunner().default_environment(options)
    if environment_type == "DOCKER":
        assert environment.container_image == IMAGE
        assert config.token_secret is not None  # Flink's containers get no environment variable of ours
    else:
        assert environment.url == "localhost:50000"
    # Nothing for the workers to fetch from the job server: the package is in the image.
    assert list(python_sdk_dependencies(options)) == []
