"""The sink's graph is typed the same way on every supported Beam (README, "Supported versions").

Beam checks type hints when a pipeline is built, and picks each PCollection's
coder from its type: these tests build the graph and read both back, so that
a Beam release that infers types differently fails here rather than in a
user's pipeline.
"""

import re

import apache_beam as beam
import pytest
from apache_beam.transforms.window import FixedWindows, Sessions, SlidingWindows

from sinks.tinybird import WriteToTinybird

_TUPLE = "beam:coder:tuple:v1"


def _coders_by_output(pipeline: beam.Pipeline) -> dict[str, tuple[str, ...]]:
    """``{"<step>.<output>": (coder urn, component coder urns...)}`` for the sink's own steps."""
    proto = pipeline.to_runner_api()
    coders = proto.components.coders
    found = {}
    for pcoll in proto.components.pcollections.values():
        # The proto's names carry a length prefix: "74WriteToTinybird/EncodeAndBatch/...full".
        name = re.sub(r"^\d+", "", pcoll.unique_name)
        if not name.startswith("WriteToTinybird/"):
            continue
        step = name.split("/")[1].split(".")[0]
        output = name.rsplit(".", 1)[-1]
        coder = coders[pcoll.coder_id]
        found[f"{step}.{output}"] = (coder.spec.urn, *(coders[c].spec.urn for c in coder.component_coder_ids))
    return found


@pytest.mark.parametrize("windowfn", [None, FixedWindows(10), SlidingWindows(10, 5), Sessions(10)])
def test_bounded_graph_builds_and_batches_travel_as_tuples(windowfn):
    pipeline = beam.Pipeline()
    rows = pipeline | beam.Create([{"id": i} for i in range(3)])
    if windowfn is not None:
        rows = rows | beam.WindowInto(windowfn)
    _ = rows | "WriteToTinybird" >> WriteToTinybird(datasource="t", token="x", api_url="http://127.0.0.1:9")

    coders = _coders_by_output(pipeline)

    # The full batches and the merged batches: (window text, payload, rows, window bytes, timestamps, data source).
    batch = (_TUPLE, "beam:coder:string_utf8:v1", "beam:coder:bytes:v1", "beam:coder:varint:v1",
             "beam:coder:bytes:v1", "beam:coder:bytes:v1", "beam:coder:string_utf8:v1")
    if windowfn is None or not windowfn.is_merging():
        # Merging windows send every buffer through the GroupByKey that merges them.
        assert coders["EncodeAndBatch.full"] == batch
    assert coders["MergeRemainders.None"] == batch
    # The chunks keyed by (shard, window end, window text, window bytes, data source): key and value coded as tuples, never pickled.
    assert coders["EncodeAndBatch.None"][:2] == ("beam:coder:kv:v1", _TUPLE)
    assert "beam:coder:pickled_python:v1" not in coders["EncodeAndBatch.None"]


@pytest.mark.parametrize("dead_letter_format", ["json", "avro"])
@pytest.mark.parametrize("windowfn", [None, FixedWindows(10), SlidingWindows(10, 5), Sessions(10)])
@pytest.mark.parametrize("bounded", [True, False], ids=["bounded", "unbounded"])
def test_every_graph_with_dead_letter_files_builds(windowfn, bounded, dead_letter_format, tmp_path):
    """Construction is where a release's type inference bites (a NamedTuple through a
    GroupByKey in 2.78): every shape of the graph, dead-letter files included, is built."""
    from apache_beam.options.pipeline_options import PipelineOptions, StandardOptions
    from apache_beam.testing.test_stream import TestStream

    options = PipelineOptions()
    options.view_as(StandardOptions).streaming = not bounded
    pipeline = beam.Pipeline(options=options)
    source = beam.Create([{"id": i} for i in range(3)]) if bounded else TestStream().add_elements([{"id": 1}])
    rows = pipeline | source
    if windowfn is not None:
        rows = rows | beam.WindowInto(windowfn)
    result = rows | "WriteToTinybird" >> WriteToTinybird(
        datasource="t", token="x", api_url="http://127.0.0.1:9", dead_letter_path=f"{tmp_path}/",
        dead_letter_format=dead_letter_format)

    assert set(result) == {"dead_letters", "dead_letter_files"}
    assert pipeline.to_runner_api().components.pcollections


def _dofn_classes() -> list[type]:
    """Every DoFn class the sink and the pipelines define."""
    import importlib
    import pkgutil

    import pipelines
    import sinks

    for package in (sinks, pipelines):
        for module in pkgutil.walk_packages(package.__path__, package.__name__ + "."):
            importlib.import_module(module.name)
    found, pending = [], [beam.DoFn]
    while pending:
        for cls in pending.pop().__subclasses__():
            pending.append(cls)
            if cls.__module__.split(".")[0] in ("sinks", "pipelines"):
                found.append(cls)
    return sorted(found, key=lambda cls: f"{cls.__module__}.{cls.__qualname__}")


@pytest.mark.parametrize("dofn_class", _dofn_classes(), ids=lambda cls: cls.__qualname__)
def test_beam_reads_the_type_hints_of_every_dofn(dofn_class):
    """Beam reads each DoFn's annotations as type hints when a pipeline is built: an
    annotation one release accepts and another refuses (2.78 refuses ``process(...) -> None``)
    breaks construction there. Read as Beam reads them, on an instance made without arguments."""
    dofn = dofn_class.__new__(dofn_class)
    hints = beam.DoFn.default_type_hints(dofn)
    assert hints is not None
