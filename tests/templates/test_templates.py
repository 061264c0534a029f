"""Flex Templates: metadata matches the pipelines' options, regexes, Dockerfiles and the Beam pin."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import runpy
import subprocess
import sys
import tomllib
from pathlib import Path
from unittest import mock

import apache_beam
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from pipelines import files_to_tinybird, replay_dead_letters, streaming_to_tinybird
from pipelines._endpoint import Endpoint
from pipelines._options import SinkConfig

REPO_ROOT = Path(__file__).resolve().parents[2]
TEMPLATES = REPO_ROOT / "templates"
OPTIONS = {
    "files_to_tinybird": files_to_tinybird.FilesToTinybirdOptions,
    "streaming_to_tinybird": streaming_to_tinybird.StreamingToTinybirdOptions,
    "replay_dead_letters": replay_dead_letters.ReplayDeadLettersOptions,
}
STREAMING = {"streaming_to_tinybird"}
# Values Dataflow cannot do without: there is no local server and no sample data on Dataflow.
# (datasource or datasource_field: the pipeline refuses a launch with neither or both.)
REQUIRED = {
    "files_to_tinybird": {"input", "api_url"},
    "streaming_to_tinybird": {"api_url"},
    "replay_dead_letters": {"input", "api_url", "dead_letter_path"},
}
ROUTED = {"files_to_tinybird", "streaming_to_tinybird"}
"""The templates with datasource_field and datasource_prefix (the replay routes by each record)."""
PARAM_TYPES = {"TEXT", "GCS_READ_FILE", "GCS_WRITE_FOLDER", "PUBSUB_SUBSCRIPTION", "PUBSUB_TOPIC"}

# name -> (values the regexes must accept, values they must refuse)
EXAMPLES = {
    "input": (["gs://bucket/events/*.ndjson", "gs://b/x/2024-05-*.parquet", "gs://b/dl/*"],
              ["", "/local/path/*.csv", "s3://b/x", "gs://b/x\n"]),
    "format": (["auto", "ndjson", "json", "csv", "avro", "parquet"], ["", "xml", "NDJSON", "csv "]),
    "datasource": (["events", "web_events_v2", "_tmp", "e" * 100, "quarantine_log"],
                   ["", "2events", "web-events", "a b", "e" * 101, "events_quarantine"]),
    "datasource_field": (["type", "event_type", "kind", "tipo_d\u00e9v\u00e9nement"],
                         ["", "two words", "a\nb", " ", "\u00a0", "\u3000"]),
    "datasource_prefix": (["events_", "ev", "_x", "p" * 99], ["", "1st_", "web-", "a b", "p" * 100]),
    "api_url": (["https://api.tinybird.co", "https://api.us-east.aws.tinybird.co", "https://tb.example.com/",
                 "https://api.europe-west2.gcp.tinybird.co", "https://api.tinybird.co:443",
                 "https://tb.example.com:8443/tinybird/"],
                ["", "http://api.tinybird.co", "api.tinybird.co", "https://api.tinybird.co?token=x",
                 "https://a b", "https://user:pass@api.tinybird.co", "https://token@api.tinybird.co",
                 "https://api.tinybird.co:99999", "https://api.tinybird.co:abc", "https://:443",
                 "https://[::1]:8443"]),
    "token": (["p.eyJ1IjoiYSJ9.x-y_z", "p.eyJ1IjogIjEyMzQ1Njc4In0.AbC-dEf_123="], ["", "two words", "\u00a0", "t\u00f6k"]),
    "token_env": (["TINYBIRD_TOKEN", "tb_token2"], ["", "1TOKEN", "MY-TOKEN"]),
    "token_secret": (["projects/p/secrets/tinybird/versions/latest", "projects/123/secrets/tb/versions/3"],
                     ["", "tinybird", "projects/p/secrets/tinybird", "projects/p/secrets/s/versions/",
                      "projects//secrets/s/versions/1", "projects/p/secrets/s/versions/1/extra",
                      "projects/p\u00a0/secrets/s/versions/1", "projects/p/secrets/s/versions/1\u2003"]),
    "wait": (["true", "false"], ["", "yes", "True", "1"]),
    "compression": (["zstd", "gzip", "none"], ["", "brotli", "ZSTD"]),
    "max_batch_bytes": (["1048576", "8388608", "2", "10000000", "100000000"],
                        ["", "0", "1", "-1", "1.5", "8MiB", "01", "100000001", "104857600", "999999999999999999"]),
    "max_batch_rows": (["1", "200000"], ["", "0", "1e5"]),
    "num_shards": (["1", "8", "64"], ["", "0", "eight"]),
    "max_windows_per_bundle": (["1", "20", "500"], ["", "0", "-1", "twenty", "2.5"]),
    "dead_letter_path": (["gs://bucket/tinybird/dead-letters/"], ["", "dead-letters/", "/tmp/dl"]),
    "dead_letter_format": (["json", "avro"], ["", "jsonl", "parquet"]),
    "input_subscription": (["projects/my-project/subscriptions/s"],
                           ["", "s", "projects/my-project/topics/t", "projects/my-project/subscriptions/s/x"]),
    "input_topic": (["projects/my-project/topics/t"], ["", "t", "projects/my-project/subscriptions/s"]),
    "window_secs": (["1", "60", "3600", "1000000000"], ["", "0", "1.5", "-60", "1000000001", "999999999999999999"]),
    "timestamp_attribute": (["event_time", "ts"], ["", "two words"]),
    "max_buffering_secs": (["5", "0.5", ".5", "1.25", "10.0", "0.001", "3600", "1000000000"],
                           ["", "0", "0.0", "-1", "five", "1e3", "1000000001", "1000000000.5", "9" * 400,
                            "0." + "0" * 400 + "1", "0.0000000001", "inf", "nan"]),
    "max_dead_letter_ratio": (["0", "0.01", "0.5", "1", "1.0"], ["", "-0.1", "1.5", "2", "1e-2", "abc", "5%"]),
}
# The sink's options (checked by building the sink) whose template regex refuses more than the
# sink does, and why. Any other value a regex refuses, the pipeline refuses too.
STRICTER_IN_TEMPLATE = {
    ("api_url", ""): "required in a template; on a command line no --api_url means the embedded server",
    ("api_url", "https://a b"): "the sink does not check the host name's characters (ClientSettings)",
    ("token", ""): "an empty --token is ignored on a command line (the token is looked for elsewhere)",
    ("token", "two words"): "the sink checks the token's characters on the workers, when it is resolved",
    ("token_secret", ""): "an empty --token_secret is ignored on a command line",
    ("wait", "yes"): "a command line also takes yes/no, 1/0 and any case",
    ("wait", "True"): "a command line also takes yes/no, 1/0 and any case",
    ("wait", "1"): "a command line also takes yes/no, 1/0 and any case",
    ("max_buffering_secs", "1e3"): "a command line takes any float spelling",
    ("max_buffering_secs", "0.0000000001"): "more than 9 decimals (the form cannot tell which round to 0)",
    ("api_url", "https://[::1]:8443"): "the sink takes an IPv6 literal; no Tinybird region is reached by one",
    ("token", "t\u00f6k"): "Tinybird tokens are ASCII; the sink checks a token's characters only on the workers",
    ("dead_letter_path", "dead-letters/"): "templates write to Cloud Storage; a command line may write locally",
    ("dead_letter_path", "/tmp/dl"): "templates write to Cloud Storage; a command line may write locally",
    ("datasource_field", "two words"): "a command line takes any field name (a JSON key may hold a space)",
    ("datasource_prefix", ""): "an empty --datasource_prefix is no prefix on a command line",
}


def _metadata(name: str) -> dict:
    return json.loads((TEMPLATES / name / "metadata.json").read_text(encoding="utf-8"))


# Options that only make sense for a run on this machine (a template always runs on Dataflow),
# so no template has them as parameters.
LOCAL_ONLY_OPTIONS = {"stop_after_secs"}


def _option_names(options_class) -> list:
    """The options the pipeline itself declares, in order (runner options are not among them)."""
    parser = argparse.ArgumentParser(add_help=False)
    options_class._add_argparse_args(parser)  # pylint: disable=protected-access
    return [action.dest for action in parser._actions  # pylint: disable=protected-access
            if action.dest not in LOCAL_ONLY_OPTIONS]


def _matches(regexes, value: str) -> bool:
    """Whether Dataflow takes ``value``: it must match every regex of its parameter, whole (Java's
    ``matches()``; Python's ``$`` also matches before a final newline). Java's ``\\s``, ``\\d`` and
    ``\\w`` are ASCII only (a no-break space is ``\\S``), as Python's are with ``re.ASCII``."""
    return all(re.fullmatch(regex, value, re.ASCII) for regex in regexes)


def test_every_pipeline_has_a_template_folder():
    folders = sorted(p.name for p in TEMPLATES.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))
    assert folders == sorted(OPTIONS)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_metadata_is_valid(name):
    metadata = _metadata(name)
    assert isinstance(metadata["name"], str) and metadata["name"]
    assert isinstance(metadata["description"], str) and len(metadata["description"]) > 40
    assert metadata["streaming"] is (name in STREAMING)
    if name in STREAMING:
        assert metadata["supportsAtLeastOnce"] is True and metadata["supportsExactlyOnce"] is True
        assert metadata["defaultStreamingMode"] in ("UNSPECIFIED", "AT_LEAST_ONCE", "EXACTLY_ONCE")
    assert set(metadata) <= {"name", "description", "streaming", "supportsAtLeastOnce",
                             "supportsExactlyOnce", "defaultStreamingMode", "parameters"}
    for parameter in metadata["parameters"]:
        assert set(parameter) <= {"name", "label", "helpText", "isOptional", "regexes", "paramType"}
        assert re.fullmatch(r"[a-z][a-z0-9_]*", parameter["name"])
        assert isinstance(parameter["label"], str) and parameter["label"].strip()
        assert isinstance(parameter["helpText"], str) and len(parameter["helpText"]) >= 20
        assert isinstance(parameter["isOptional"], bool)
        assert parameter.get("paramType", "TEXT") in PARAM_TYPES
        assert parameter["regexes"] and all(isinstance(r, str) for r in parameter["regexes"])
        for regex in parameter["regexes"]:
            re.compile(regex)
            assert regex.startswith("^") and regex.endswith("$")  # whole-value checks


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_parameters_match_the_pipeline_options_one_to_one(name):
    parameters = [p["name"] for p in _metadata(name)["parameters"]]
    options = _option_names(OPTIONS[name])
    assert len(parameters) == len(set(parameters))
    assert parameters == options


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_required_parameters(name):
    required = {p["name"] for p in _metadata(name)["parameters"] if not p["isOptional"]}
    assert required == REQUIRED[name]


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_regexes_accept_good_and_refuse_bad_values(name):
    for parameter in _metadata(name)["parameters"]:
        good, bad = EXAMPLES[parameter["name"]]
        for value in good:
            assert _matches(parameter["regexes"], value), (name, parameter["name"], value)
        for value in bad:
            assert not _matches(parameter["regexes"], value), (name, parameter["name"], value)


# A launch that passes every check, into which one parameter at a time is put. Its input's extension
# names the format, and the replay writes to another bucket than it reads: those rules join two
# parameters, which no regex can (the job refuses such a launch before it starts).
LAUNCH = {
    "files_to_tinybird": {"input": "gs://in-bucket/events/*.ndjson", "api_url": "https://api.tinybird.co",
                          "datasource": "events"},
    "streaming_to_tinybird": {"input_subscription": "projects/my-project/subscriptions/events",
                              "api_url": "https://api.tinybird.co", "datasource": "events"},
    "replay_dead_letters": {"input": "gs://in-bucket/dead-letters/*", "api_url": "https://api.tinybird.co",
                            "dead_letter_path": "gs://out-bucket/replayed/"},
}
CROSS_PARAMETER = {
    ("files_to_tinybird", "input"): ["--format=ndjson"],  # format auto needs an extension it knows
}
# Checked again when the job's graph is built (by Beam's ReadFromPubSub), which takes a quarter of a
# second: the other parameters are launched without building it (timestamp_attribute too: Beam 2.77
# passes it on unchecked).
GRAPH_PARAMETERS = {"input_subscription", "input_topic"}


def _launch_argv(name: str, parameter: str, value: str) -> list[str]:
    values = dict(LAUNCH[name])
    if parameter in ("datasource_field", "datasource_prefix"):
        del values["datasource"]
        values.setdefault("datasource_field", "type")
    if parameter == "input_topic":
        del values["input_subscription"]
    values[parameter] = value
    return [f"--{key}={text}" for key, text in values.items()] + CROSS_PARAMETER.get((name, parameter), [])


def _launch_refusal(name: str, argv: list[str], *, build_graph: bool) -> str | None:
    """Runs the pipeline's own ``run(argv)`` as the template launcher does, up to where the job would
    start (no file is listed, nothing is sent): None when it gets there, else why it stopped."""
    module = sys.modules[f"pipelines.{name}"]

    def submit(**kwargs):
        if build_graph:
            config = kwargs["config"]
            kwargs["build"](apache_beam.Pipeline(), Endpoint(api_url=config.api_url), config)

    with contextlib.ExitStack() as stack:
        for attribute in ("run_pipeline", "run_until_stopped", "check_input_exists"):
            if hasattr(module, attribute):
                replacement = submit if attribute != "check_input_exists" else (lambda *args, **kwargs: None)
                stack.enter_context(mock.patch.object(module, attribute, replacement))
        stack.enter_context(contextlib.redirect_stderr(io.StringIO()))  # argparse's usage text
        try:
            module.run(argv)
        except SystemExit as error:  # argparse refused the value
            return f"argparse: exit {error.code}"
        except (ValueError, TypeError) as error:  # UsageError is a ValueError
            return f"{type(error).__name__}: {error}"
    return None


def _check_taken_by_the_launch(name: str, parameter: dict, value: str) -> None:
    if not _matches(parameter["regexes"], value):
        return
    refusal = _launch_refusal(name, _launch_argv(name, parameter["name"], value),
                              build_graph=parameter["name"] in GRAPH_PARAMETERS)
    assert refusal is None, f"{name}: {parameter['name']}={value!r} passes the template's regexes, but {refusal}"


def _parameters() -> list[tuple[str, dict]]:
    return [(name, parameter) for name in sorted(OPTIONS) for parameter in _metadata(name)["parameters"]]


def _parameter_id(case) -> str:
    return f"{case[0]}-{case[1]['name']}" if isinstance(case, tuple) else str(case)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_values_the_template_accepts_are_accepted_by_the_pipeline(name):
    """What passes Dataflow's regexes must not fail later, when the job starts."""
    for parameter in _metadata(name)["parameters"]:
        for value in EXAMPLES[parameter["name"]][0]:
            assert _matches(parameter["regexes"], value), (name, parameter["name"], value)
            _check_taken_by_the_launch(name, parameter, value)


# Every character Python's str.isspace() takes (Python's \s), most of which Java's \s is not.
UNICODE_SPACES = "".join(chr(c) for c in range(0x110000) if chr(c).isspace())
TRICKY_VALUES = [
    "", " ", "\n", "0", "1", "2", "-1", "+1", "01", "1.", ".5", "1e3", "1E+3", "-0", "nan", "NaN", "inf", "-inf",
    "Infinity", "1_000", "\u0661\u0662", "\uff11\uff12", "\u00b2", "9" * 18, "9" * 19, "9" * 400,
    "1" + "0" * 9, "1" + "0" * 9 + "1", "100000000", "100000001", "104857600", "1e-400", "0." + "0" * 400 + "1",
    "https://user:pass@api.tinybird.co", "https://token@api.tinybird.co", "https://@api.tinybird.co",
    "https://api.tinybird.co:443", "https://api.tinybird.co:65535", "https://api.tinybird.co:65536",
    "https://api.tinybird.co:99999", "https://api.tinybird.co:0", "https://api.tinybird.co:+443",
    "https://api.tinybird.co:abc", "https://api.tinybird.co:", "https://:443", "https://[::1", "https://[::1]:8443",
    "https://[]", "https://api.tinybird.co/v0/", "https://api.tinybird.co?x=1", "https://api.tinybird.co#x",
    "https://api.tinybird.co/a;b", "https://api.tinybird.co\u00a0", "https://\u00e9.example", "https://a\u00a0b",
    "https://api.tinybird.co/\u2003", "projects/p/subscriptions/s", "projects/P/topics/t",
    "projects/my-project/subscriptions/s", "projects/my-project/topics/t", "projects/12345678/topics/t",
    "projects/example.com:my-project/topics/t", "projects/my-project/subscriptions/s\u00a0",
    "projects/p/secrets/s/versions/1", "projects/my-project/secrets/tb\u00a0/versions/latest",
    "gs://in-bucket/x", "gs://in-bucket/x.avro.gz", "gs://", "gs://\u00a0",
    *UNICODE_SPACES, *(f"a{space}b" for space in UNICODE_SPACES), *(f"{space}a" for space in UNICODE_SPACES),
]


@pytest.mark.parametrize("case", _parameters(), ids=_parameter_id)
def test_tricky_values_the_template_accepts_are_accepted_by_the_pipeline(case):
    """Signs, exponents, huge numbers, nan/inf, unicode digits and spaces (\\s is ASCII in Java), a
    trailing newline, URLs with userinfo, ports, paths and queries: a value that passes the
    template's regexes as Dataflow reads them passes the pipeline's own checks too."""
    name, parameter = case
    good = EXAMPLES[parameter["name"]][0]
    values = [*TRICKY_VALUES, *good, *(f"{value}\n" for value in good), *(f" {value}" for value in good),
              *(value + space for value in good for space in UNICODE_SPACES)]
    for value in values:
        _check_taken_by_the_launch(name, parameter, value)


def _near_misses(value: str) -> st.SearchStrategy[str]:
    """``value`` with one character put in or replaced: a sign, an exponent, a unicode digit or space..."""
    tricky = st.sampled_from(["+", "-", "e", "E", ".", "0", "9", "@", ":", "/", "?", "#", "_", "\n",
                              "\u0661", "\uff10", *UNICODE_SPACES]) | st.characters()
    return st.tuples(st.integers(0, len(value)), st.booleans(), tricky).map(
        lambda edit: value[:edit[0]] + edit[2] + value[edit[0] + edit[1]:])


@pytest.mark.parametrize("case", _parameters(), ids=_parameter_id)
@settings(max_examples=25, deadline=None)
@given(data=st.data())
def test_every_value_the_template_accepts_is_accepted_by_the_pipeline(case, data):
    """The same, for values drawn from each regex (as Python reads it) and their near misses."""
    name, parameter = case
    drawn = st.one_of([st.from_regex(regex, fullmatch=True) for regex in parameter["regexes"]])
    value = data.draw(drawn | drawn.flatmap(_near_misses) | st.text(max_size=12), label="value")
    _check_taken_by_the_launch(name, parameter, value)


def _destination_besides(parameter: str) -> list[str]:
    """What a launch needs besides ``parameter`` to name where rows go (datasource or datasource_field)."""
    if parameter in ("datasource", "datasource_field"):
        return []
    if parameter == "datasource_prefix":
        return ["--datasource_field=type"]
    return ["--datasource=events"]


def _sink_option_names() -> set[str]:
    from pipelines._options import add_sink_arguments

    parser = argparse.ArgumentParser(add_help=False)
    add_sink_arguments(parser, streaming=True)
    return {action.dest for action in parser._actions}  # pylint: disable=protected-access


def _pipeline_refuses(options_class, argv) -> bool:
    """True when parsing ``argv`` or building the sink from it fails (what a launch would do)."""
    try:
        SinkConfig.from_options(options_class(argv))
    except (ValueError, TypeError, SystemExit):  # SystemExit: argparse's own refusal
        return True
    return False


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_values_the_template_refuses_are_refused_by_the_sink(name, capsys):
    """The regexes are a copy of the sink's rules for the launch form: checked against the sink itself."""
    sink_options = _sink_option_names() - {"max_dead_letter_ratio"}
    for parameter in _metadata(name)["parameters"]:
        if parameter["name"] not in sink_options:
            continue
        for value in EXAMPLES[parameter["name"]][1]:
            if (parameter["name"], value) in STRICTER_IN_TEMPLATE:
                continue
            argv = [f"--{parameter['name']}={value}", *_destination_besides(parameter["name"])]
            if parameter["name"] != "api_url":
                argv.append("--api_url=https://api.tinybird.co")
            assert _pipeline_refuses(OPTIONS[name], argv), (name, parameter["name"], value)
    capsys.readouterr()


def _documented_default(help_text: str) -> str | None:
    match = re.search(r"\bDefault ([^\s:,;()]+?)\.?(?=[\s(]|$)", help_text)
    if match is None:
        match = re.search(r"\b(\w+) \((?:[^()]*; )?default\)", help_text)
    return None if match is None else match.group(1)


def _as_parameter(value) -> str:
    if isinstance(value, bool):
        return str(value).lower()
    return f"{value:g}" if isinstance(value, float) else str(value)


def test_the_files_template_says_which_formats_may_be_compressed_as_the_option_does():
    from pipelines._formats import COMPRESSIBLE_FORMATS

    parser = argparse.ArgumentParser(add_help=False)
    files_to_tinybird.FilesToTinybirdOptions._add_argparse_args(parser)  # pylint: disable=protected-access
    option = {action.dest: action.help for action in parser._actions}["input"]  # pylint: disable=protected-access
    parameter = {p["name"]: p for p in _metadata("files_to_tinybird")["parameters"]}["input"]["helpText"]
    said = ("NDJSON, JSON and CSV files may be compressed (.gz, .bz2, .zst, .deflate, .xz); "
            "Avro and Parquet may not (they compress inside the file, with a codec).")
    assert said in option and said in parameter
    assert COMPRESSIBLE_FORMATS == ("ndjson", "json", "csv")


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_documented_defaults_are_the_pipelines_and_the_sinks(name):
    parser = argparse.ArgumentParser(add_help=False)
    OPTIONS[name]._add_argparse_args(parser)  # pylint: disable=protected-access
    defaults = {action.dest: action.default for action in parser._actions}  # pylint: disable=protected-access
    defaults["wait"] = False  # a template always has an api_url: the sink's default applies
    documented = {p["name"]: _documented_default(p["helpText"]) for p in _metadata(name)["parameters"]}
    documented = {key: value for key, value in documented.items() if value is not None}
    assert {"token_env", "max_batch_bytes", "max_batch_rows", "num_shards", "max_windows_per_bundle",
            "compression", "wait",
            "dead_letter_format", "max_dead_letter_ratio"} <= set(documented)
    for parameter, text in documented.items():
        assert text == _as_parameter(defaults[parameter]), (name, parameter)


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_datasource_field_and_prefix_where_rows_name_their_data_source(name):
    from pipelines._options import DATASOURCE_PREFIX_PATTERN

    parameters = {p["name"]: p for p in _metadata(name)["parameters"]}
    assert parameters["datasource"]["isOptional"] is True
    if name not in ROUTED:
        assert not {"datasource_field", "datasource_prefix"} & set(parameters)
        assert "each line goes back to the data source its dead-letter record names" in parameters["datasource"]["helpText"]
        return
    names = list(parameters)
    assert names[names.index("datasource"):names.index("datasource") + 3] == [
        "datasource", "datasource_field", "datasource_prefix"]
    assert parameters["datasource_field"]["isOptional"] is parameters["datasource_prefix"]["isOptional"] is True
    assert parameters["datasource_prefix"]["regexes"] == [DATASOURCE_PREFIX_PATTERN]
    assert "Give datasource or datasource_field, not both" in parameters["datasource_field"]["helpText"]
    # Neither, or both: passed by Dataflow's regexes, refused by the pipeline before the job starts.
    for argv in ([], ["--datasource=events", "--datasource_field=type"]):
        assert _pipeline_refuses(OPTIONS[name], ["--api_url=https://api.tinybird.co", *argv]), argv


def test_token_secret_regex_is_the_sinks():
    from sinks.tinybird import _token

    for name in OPTIONS:
        (secret,) = [p for p in _metadata(name)["parameters"] if p["name"] == "token_secret"]
        assert secret["regexes"] == [_token._SECRET_VERSION.pattern]  # pylint: disable=protected-access


def test_pubsub_regexes_are_the_pipelines():
    parameters = {p["name"]: p for p in _metadata("streaming_to_tinybird")["parameters"]}
    assert parameters["input_subscription"]["regexes"] == [streaming_to_tinybird.SUBSCRIPTION_PATTERN]
    assert parameters["input_topic"]["regexes"] == [streaming_to_tinybird.TOPIC_PATTERN]


def _beam_pin() -> Version:
    lines = [line.strip() for line in (REPO_ROOT / "constraints.txt").read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    requirements = [Requirement(line) for line in lines]
    beam = [r for r in requirements if r.name == "apache-beam"]
    assert len(beam) == 1, "constraints.txt pins apache-beam exactly once"
    (specifier,) = list(beam[0].specifier)
    assert specifier.operator == "==" and not beam[0].extras
    return Version(specifier.version)


def test_beam_pin_satisfies_pyproject_and_is_the_tested_version():
    pin = _beam_pin()
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    beam_ranges = [Requirement(r) for r in project["dependencies"] + project["optional-dependencies"]["gcp"]
                   if Requirement(r).name == "apache-beam"]
    assert len(beam_ranges) == 2
    for requirement in beam_ranges:
        assert pin in requirement.specifier, f"{pin} is outside {requirement}"
    assert pin == Version(apache_beam.__version__), "the images must run the Beam version tested here"
    assert Version("3.11") in SpecifierSet(project["requires-python"])  # python311 launcher image


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_dockerfile(name):
    dockerfile = (TEMPLATES / name / "Dockerfile").read_text(encoding="utf-8")
    instructions = [line for line in dockerfile.splitlines() if line and not line.startswith("#")]
    assert instructions[0] == "FROM gcr.io/dataflow-templates-base/python311-template-launcher-base"
    env = dict(re.findall(r"^ENV (\w+)=(\S+)$", dockerfile, re.MULTILINE))
    assert env["FLEX_TEMPLATE_PYTHON_PY_FILE"] == f"/template/templates/{name}/main.py"
    assert env["FLEX_TEMPLATE_PYTHON_SETUP_FILE"] == "/template/setup.py"
    assert 'pip install --no-cache-dir -c constraints.txt "/template[gcp]"' in dockerfile
    # The Beam version comes from constraints.txt only.
    assert not re.search(r"apache[-_]beam\S*==", dockerfile)
    # The build context is the repository root: every COPY source is in the repository, and
    # the project's packages and the files its build needs (the readme too) are copied.
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    readme = project["readme"] if isinstance(project["readme"], str) else project["readme"]["file"]
    sources = [source for line in instructions if line.startswith("COPY ") for source in line.split()[1:-1]]
    assert {"pyproject.toml", "setup.py", readme, "constraints.txt", "sinks", "pipelines", "templates"} <= set(sources)
    # The local server is a test tool: production images do not hold it.
    assert "tinybird_emulator" not in sources
    for source in sources:
        # The readme is the packaging's to provide (pip install . needs it as much as the image).
        assert source == readme or (REPO_ROOT / source).exists(), f"{name}/Dockerfile copies a missing {source}"
    assert "WORKDIR /template" in instructions


@pytest.mark.parametrize("name", sorted(OPTIONS))
def test_entry_point_runs_the_pipelines_main(name, monkeypatch):
    called = []
    module = sys.modules[f"pipelines.{name}"]
    monkeypatch.setattr(module, "main", lambda: called.append(name))
    runpy.run_path(str(TEMPLATES / name / "main.py"), run_name="__main__")
    assert called == [name]


def test_files_template_as_the_launcher_runs_it(tmp_path):
    """The entry point run as a script with --name=value parameters, as the Flex Template launcher does."""
    from tinybird_emulator import LocalServer

    (tmp_path / "in.ndjson").write_text("".join(json.dumps({"id": i}) + "\n" for i in range(20)))
    with LocalServer(data_dir=tmp_path / "tb", rate_limit_rps=None) as server:
        parameters = {
            "input": str(tmp_path / "*.ndjson"), "format": "ndjson", "datasource": "launched",
            "api_url": server.url, "token_env": "LAUNCHER_TB_TOKEN", "wait": "true", "compression": "gzip",
            "max_batch_bytes": "4096", "max_batch_rows": "7", "num_shards": "2",
            "max_windows_per_bundle": "3",
            "dead_letter_path": str(tmp_path / "dead") + "/", "dead_letter_format": "avro",
            "max_dead_letter_ratio": "0",
        }
        assert set(parameters) | {"token", "token_secret", "datasource_field", "datasource_prefix"} == set(
            _option_names(OPTIONS["files_to_tinybird"]))
        result = subprocess.run(
            [sys.executable, str(TEMPLATES / "files_to_tinybird" / "main.py"),
             *(f"--{k}={v}" for k, v in parameters.items()), "--runner=FnApiRunner"],
            cwd=tmp_path, capture_output=True, text=True, timeout=240,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "LAUNCHER_TB_TOKEN": server.token})
        assert result.returncode == 0, result.stderr[-3000:]
        server.flush()
        assert server.query("SELECT count(*) AS n FROM launched") == [{"n": 20}]
        assert re.search(r"^  requests \(retries\)\s+3\s", result.stdout, re.MULTILINE)  # 7 + 7 + 6 rows
        assert server.token not in result.stdout + result.stderr


def test_files_template_routing_by_field_as_the_launcher_runs_it(tmp_path):
    """datasource_field and datasource_prefix as launch parameters: each type in its own data source."""
    from tinybird_emulator import LocalServer

    types = ("a", "b", "c")
    (tmp_path / "in.ndjson").write_text("".join(json.dumps({"id": i, "type": types[i % 3]}) + "\n" for i in range(30)))
    with LocalServer(data_dir=tmp_path / "tb", rate_limit_rps=None) as server:
        parameters = {
            "input": str(tmp_path / "*.ndjson"), "datasource_field": "type", "datasource_prefix": "launched_",
            "api_url": server.url, "token_env": "LAUNCHER_TB_TOKEN", "wait": "true", "num_shards": "2",
        }
        result = subprocess.run(
            [sys.executable, str(TEMPLATES / "files_to_tinybird" / "main.py"),
             *(f"--{k}={v}" for k, v in parameters.items()), "--runner=FnApiRunner"],
            cwd=tmp_path, capture_output=True, text=True, timeout=240,
            env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "LAUNCHER_TB_TOKEN": server.token})
        assert result.returncode == 0, result.stderr[-3000:]
        server.flush()
        for kind in types:
            assert server.query(f"SELECT id FROM launched_{kind} ORDER BY id") == [
                {"id": i} for i in range(30) if types[i % 3] == kind]
