"""/v0/sql answers: the FORMAT clause, the column types of ``meta`` and the rendering.

Statements run in SQLite's dialect (the README says which Tinybird/ClickHouse
functions that leaves out). What this module adds is the service's answer
around them: ``FORMAT JSON`` (the default), ``JSONEachRow``, ``CSV``,
``CSVWithNames``, ``TSV``/``TabSeparated`` and ``TSVWithNames``/``TabSeparatedWithNames``;
``meta`` types taken from the data source's schema (a column read as it is keeps
its Tinybird type, through subqueries and aliases), ``count()`` as ``UInt64``; and
``statistics`` with ``elapsed``, ``rows_read`` and ``bytes_read`` plus
``rows_before_limit_at_least`` when the statement ends in a LIMIT, where
ClickHouse's JSON format puts it.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import orjson

__all__ = ["FORMATS", "FormatError", "QueryResult", "column_types", "render", "split_format", "split_limit"]

# Canonical name -> Content-Type, as ClickHouse names and serves them.
FORMATS = {
    "JSON": "application/json",
    "JSONEachRow": "application/x-ndjson",
    "CSV": "text/csv; charset=UTF-8",
    "CSVWithNames": "text/csv; charset=UTF-8",
    "TSV": "text/tab-separated-values; charset=UTF-8",
    "TSVWithNames": "text/tab-separated-values; charset=UTF-8",
}
_ALIASES = {name.lower(): name for name in FORMATS}
_ALIASES.update({"tabseparated": "TSV", "tabseparatedwithnames": "TSVWithNames", "ndjson": "JSONEachRow"})
_FORMAT_RE = re.compile(r"\s+FORMAT\s+([A-Za-z0-9_]+)\s*;?\s*$", re.IGNORECASE)
_LIMIT_RE = re.compile(r"\s+LIMIT\s+\d+(?:\s*(?:,|\s+OFFSET\s+)\s*\d+)?\s*;?\s*$", re.IGNORECASE)
# A count aggregate, by its expression text or by the alias given to it.
_COUNT_NAME_RE = re.compile(r"^count\s*\(", re.IGNORECASE)
_COUNT_ALIAS_RE = re.compile(r"\bcount\s*\([^()]*\)\s+(?:AS\s+)?[\"`]?(\w+)", re.IGNORECASE)


class FormatError(ValueError):
    """An output format the server does not write; the message lists those it does."""


def split_format(sql: str) -> tuple[str, str]:
    """``(statement without its FORMAT clause, canonical format)``; JSON when none is given.

    Raises:
        FormatError: for a format not in :data:`FORMATS`.
    """
    match = _FORMAT_RE.search(sql)
    if match is None:
        return sql.strip().rstrip(";").rstrip(), "JSON"
    canonical = _ALIASES.get(match.group(1).lower())
    if canonical is None:
        raise FormatError(
            f"unknown output format {match.group(1)!r}; the local server writes {', '.join(FORMATS)}"
        )
    return sql[: match.start()].strip(), canonical


def split_limit(sql: str) -> str | None:
    """The statement without its final LIMIT clause, or None when it has none."""
    match = _LIMIT_RE.search(sql)
    return None if match is None else sql[: match.start()]


@dataclasses.dataclass(frozen=True)
class QueryResult:
    """What a statement gave, before rendering.

    Attributes:
        names: Result column names.
        types: Their Tinybird types (see :func:`column_types`).
        rows: The rows, as SQLite gave them.
        elapsed_secs: Time spent running the statement.
        rows_read: Rows of the tables the statement read (a full scan's count).
        bytes_read: Bytes of those tables (see ``DatasourceInfo.bytes``).
        rows_before_limit: Rows without the final LIMIT, when there was one.
    """

    names: list[str]
    types: list[str]
    rows: list[tuple[Any, ...]]
    elapsed_secs: float
    rows_read: int
    bytes_read: int
    rows_before_limit: int | None


def _value_type(values: Iterable[Any]) -> str:
    kinds = {type(v) for v in values}
    nullable = type(None) in kinds
    kinds.discard(type(None))
    if kinds <= {int}:
        base = "Int64" if kinds else "String"
    elif kinds <= {int, float}:
        base = "Float64"
    else:
        base = "String"
    return f"Nullable({base})" if nullable else base


def column_types(sql: str, names: Sequence[str], rows: Sequence[tuple[Any, ...]], declared: Sequence[str]) -> list[str]:
    """The ``meta`` type of each result column.

    ``declared`` holds, per column, the Tinybird type of the schema column it reads
    as it is ('' for an expression). Expressions: ``count(...)`` (by its text or its
    alias) is UInt64; others are typed from their values, Nullable when one is NULL.
    """
    count_aliases = {alias.lower() for alias in _COUNT_ALIAS_RE.findall(sql)}
    types = []
    for index, name in enumerate(names):
        declared_type = declared[index] if index < len(declared) else ""
        if declared_type:
            types.append(declared_type)
        elif _COUNT_NAME_RE.match(name) or name.lower() in count_aliases:
            types.append("UInt64")
        else:
            types.append(_value_type(row[index] for row in rows))
    return types


# -- rendering -----------------------------------------------------------------


def _is_array(kind: str) -> bool:
    return kind.startswith("Array(")


def _is_bool(kind: str) -> bool:
    return kind in ("Bool", "Nullable(Bool)")


def _json_cells(types: Sequence[str]) -> list[Callable[[Any], Any]]:
    """Per column, what a stored value becomes in JSON: arrays (stored as their JSON
    text) are embedded as they are, Bool columns (stored 0/1) become true/false."""

    def same(value: Any) -> Any:
        return value

    def array(value: Any) -> Any:
        return orjson.Fragment(value) if isinstance(value, str) else value

    def boolean(value: Any) -> Any:
        return value if value is None else bool(value)

    def text(value: Any) -> Any:
        return value.decode("utf-8", "replace") if isinstance(value, bytes) else value

    return [array if _is_array(t) else boolean if _is_bool(t) else text if "String" in t else same for t in types]


def _objects(result: QueryResult) -> list[dict[str, Any]]:
    cells = _json_cells(result.types)
    return [{n: cell(v) for n, cell, v in zip(result.names, cells, row, strict=False)} for row in result.rows]


def _json(result: QueryResult) -> bytes:
    body: dict[str, Any] = {
        "meta": [{"name": n, "type": t} for n, t in zip(result.names, result.types, strict=False)],
        "data": _objects(result),
        "rows": len(result.rows),
    }
    if result.rows_before_limit is not None:
        body["rows_before_limit_at_least"] = result.rows_before_limit
    body["statistics"] = {
        "elapsed": result.elapsed_secs,
        "rows_read": result.rows_read,
        "bytes_read": result.bytes_read,
    }
    return orjson.dumps(body)


def _ch_array(value: Any) -> str:
    """An array's text as ClickHouse writes it in CSV and TSV: strings in single quotes."""
    items = orjson.loads(value) if isinstance(value, str) else value
    parts = []
    for item in items:
        if isinstance(item, str):
            escaped = item.replace("\\", "\\\\").replace("'", "\\'").replace("\t", "\\t").replace("\n", "\\n")
            parts.append("'" + escaped + "'")
        elif isinstance(item, bool):
            parts.append("true" if item else "false")
        else:
            parts.append(orjson.dumps(item).decode())
    return "[" + ",".join(parts) + "]"


def _plain(value: Any, kind: str) -> str | None:
    """A cell as text, None for NULL."""
    if value is None:
        return None
    if _is_array(kind):
        return _ch_array(value)
    if _is_bool(kind):
        return "true" if value else "false"
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return str(value)


def _csv_cell(value: Any, kind: str) -> str:
    text = _plain(value, kind)
    if text is None:
        return "\\N"
    if isinstance(value, (int, float)):  # numbers and Bool's true/false go unquoted
        return text
    return '"' + text.replace('"', '""') + '"'


def _tsv_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")


def _tsv_cell(value: Any, kind: str) -> str:
    text = _plain(value, kind)
    if text is None:
        return "\\N"
    # An array's elements are already escaped inside their quotes, as ClickHouse writes them.
    return text if _is_array(kind) else _tsv_escape(text)


def render(result: QueryResult, fmt: str) -> bytes:
    """The body of the answer in ``fmt`` (a key of :data:`FORMATS`)."""
    if fmt == "JSON":
        return _json(result)
    if fmt == "JSONEachRow":
        return b"".join(orjson.dumps(obj) + b"\n" for obj in _objects(result))
    lines: list[str] = []
    if fmt.startswith("CSV"):
        if fmt == "CSVWithNames":
            lines.append(",".join('"' + n.replace('"', '""') + '"' for n in result.names))
        lines.extend(",".join(map(_csv_cell, row, result.types)) for row in result.rows)
    else:
        if fmt == "TSVWithNames":
            lines.append("\t".join(map(_tsv_escape, result.names)))
        lines.extend("\t".join(map(_tsv_cell, row, result.types)) for row in result.rows)
    return "".join(line + "\n" for line in lines).encode()
