"""Data source schemas: inference from the first events and the SQL that applies them.

Nested objects are flattened into columns named after their JSONPath
(``$.purchase.datetime`` -> ``purchase_datetime``). Types follow Tinybird's
names (Int64, Float64, String, Bool, Date, DateTime, DateTime64, Array(T),
Nullable(T)). The insert statement checks every value's JSON type in SQLite (and
that a date or time exists) and is what decides what fits and what is stored;
rows that fail a check go to the quarantine table.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Iterable, Sequence
from itertools import repeat
from typing import Any

__all__ = [
    "QUARANTINE_COLUMN_TYPES",
    "QUARANTINE_FIXED_COLUMNS",
    "QUARANTINE_TABLE_PREFIX",
    "Column",
    "Schema",
    "infer_schema",
    "quote_ident",
]

MAX_FLATTEN_DEPTH = 32
MAX_COLUMNS = 1000
QUARANTINE_SUFFIX = "_quarantine"
# Tinybird's quarantine columns, plus c__raw: the row as received. They are stored in
# a table of the server's own (QUARANTINE_TABLE_PREFIX + name); NAME_quarantine is a
# view of it with the documented columns only, in the documented order:
# c__error_column, c__error, c__import_id, the data source's columns, insertion_date.
QUARANTINE_FIXED_COLUMNS = ("c__error_column", "c__error", "c__import_id", "insertion_date", "c__raw")
QUARANTINE_TABLE_PREFIX = "_emulator_quarantine_"
# The documented types of the quarantine columns; the data source's columns are Nullable(String).
QUARANTINE_COLUMN_TYPES = {
    "c__error_column": "Array(String)",
    "c__error": "Array(String)",
    "c__import_id": "Nullable(String)",
    "insertion_date": "DateTime",
}

_DATETIME_RE = re.compile(r"^\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}(Z|[+-]\d{2}:\d{2})?$")
_DATETIME64_RE = re.compile(r"^\d{4}-\d{2}-\d{2}[ T]\d{2}:\d{2}:\d{2}\.\d{1,9}(Z|[+-]\d{2}:\d{2})?$")
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
_DATE_PREFIX_RE = re.compile(r"^\d{4}-\d{2}-\d{2}")
_DATE_PREFIX_LINE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}", re.MULTILINE)
# Lines that are all of one kind (each pattern without its anchors, once per line).
_DATE_KIND_LINES = tuple(
    (kind, re.compile("(?:" + pattern.pattern[1:-1] + "\n)*"))
    for kind, pattern in (("DateTime", _DATETIME_RE), ("DateTime64", _DATETIME64_RE), ("Date", _DATE_RE))
)
_IDENT_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_DATETIME_GLOB = "[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9][ T][0-9][0-9]:[0-9][0-9]:[0-9][0-9]*"
_DATE_GLOB = "[0-9][0-9][0-9][0-9]-[0-9][0-9]-[0-9][0-9]"

_EMPTY_ARRAY = "Array()"
# Scalar columns whose value is a JSON string (or may be: String takes numbers too).
_TEXT_BASES = frozenset({"String", "DateTime", "DateTime64", "Date"})
_SCALARS = ("Int64", "Float64", "String", "Bool", "Date", "DateTime", "DateTime64")
_ELEMENT_JSON_TYPES = {
    "Int64": "('integer')",
    "Float64": "('integer','real')",
    "Bool": "('true','false')",
    "String": "('text','integer','real')",
}


def quote_ident(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _sql_str(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


@dataclasses.dataclass(frozen=True)
class Column:
    """A column of a data source.

    Attributes:
        name: Column name (an SQL identifier).
        base: Type without Nullable: Int64, Float64, String, Bool, Date, DateTime,
            DateTime64, or Array(Int64|Float64|String|Bool).
        nullable: Missing and null values are accepted (stored as NULL, ``[]`` for arrays).
        jsonpath: Tinybird-style JSONPath, e.g. ``$.purchase.datetime``.
        sql_path: The same path in SQLite's syntax.
    """

    name: str
    base: str
    nullable: bool
    jsonpath: str
    sql_path: str

    @property
    def type(self) -> str:
        # ClickHouse has no Nullable(Array(T)): a missing array is an empty one.
        if self.nullable and not self.base.startswith("Array("):
            return f"Nullable({self.base})"
        return self.base

    @property
    def affinity(self) -> str:
        if self.base in ("Int64", "Bool"):
            return "INTEGER"
        if self.base == "Float64":
            return "REAL"
        return "TEXT"

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "jsonpath": self.jsonpath,
            "base": self.base,
            "nullable": self.nullable,
            "sql_path": self.sql_path,
        }

    @classmethod
    def from_json(cls, obj: dict[str, Any]) -> Column:
        return cls(
            name=obj["name"],
            base=obj["base"],
            nullable=bool(obj["nullable"]),
            jsonpath=obj["jsonpath"],
            sql_path=obj["sql_path"],
        )

    # -- SQL fragments ---------------------------------------------------------
    #
    # Each value is extracted once from the row's JSON text ``v`` into an alias
    # (``x0``, ``x1``...) by an inner query; the checks and conversions then work
    # on plain SQL values. Accepted like ClickHouse's JSON input defaults: bools
    # as numbers, numbers/objects/arrays as strings, a date alone as a DateTime.

    def sql_extract(self) -> str:
        """The raw value: ``->>`` (SQL value) for scalars, ``->`` (JSON text) for arrays."""
        op = "->" if self.base.startswith("Array(") else "->>"
        return f"(v {op} {_sql_str(self.sql_path)})"

    def sql_check(self, x: str) -> str:
        """1 when the extracted value ``x`` fits this column, else 0 (never NULL)."""
        base = self.base
        if base == "Int64":
            fits = f"typeof({x}) = 'integer'"
        elif base == "Float64":
            fits = f"typeof({x}) IN ('integer','real')"
        elif base == "Bool":
            fits = f"typeof({x}) = 'integer' AND {x} IN (0, 1)"
        elif base == "String":
            fits = f"typeof({x}) IN ('text','integer','real')"
        elif base in ("DateTime", "DateTime64"):
            # A date alone is 10 characters; else the first 19 are the local date and
            # time, before any fraction or time zone (which would normalise it).
            fits = (
                f"typeof({x}) = 'text' AND ({x} GLOB {_sql_str(_DATETIME_GLOB)} OR {x} GLOB {_sql_str(_DATE_GLOB)}) "
                f"AND datetime({x}) IS NOT NULL AND CASE WHEN length({x}) = 10 THEN {_possible_date(x)} "
                f"ELSE {_possible_datetime(f'substr({x}, 1, 19)')} END"
            )
        elif base == "Date":
            fits = (
                f"typeof({x}) = 'text' AND {x} GLOB {_sql_str(_DATE_GLOB)} AND date({x}) IS NOT NULL "
                f"AND {_possible_date(x)}"
            )
        elif base.startswith("Array("):
            allowed = _ELEMENT_JSON_TYPES[base[6:-1]]
            fits = (
                f"substr({x}, 1, 1) = '[' AND NOT EXISTS "
                f"(SELECT 1 FROM json_each({x}) AS e WHERE e.type NOT IN {allowed})"
            )
        else:  # pragma: no cover - schemas are built by this module
            raise ValueError(f"unknown column type {base!r}")
        if base in _TEXT_BASES:
            fits = f"{fits} AND NOT {self.sql_holds_nul()}"
        if self.nullable:
            absent = f"{x} IS NULL OR {x} = 'null'" if base.startswith("Array(") else f"{x} IS NULL"
            return f"coalesce({absent} OR ({fits}), 0)"
        return f"coalesce(({fits}), 0)"

    def sql_holds_nul(self) -> str:
        """1 when this column's value is a string holding ``\\u0000``, else 0.

        SQLite's ``->>`` ends a string at its first NUL ("a\\u0000b" gives "a"), so
        such a value would be stored cut short, or a cut-off date would fit: the row
        is quarantined instead. The escape is looked for in the value's JSON text once
        escaped backslashes (``\\\\``) are removed; ``z`` tells whether the row's text
        holds it at all, so that the usual row costs one search.
        """
        return f"(z <> 0 AND coalesce(instr(replace((v -> {_sql_str(self.sql_path)}), '\\\\', ''), '\\u0000'), 0) <> 0)"

    def sql_store(self, x: str) -> str:
        """The value to store from the extracted ``x``, assuming :meth:`sql_check` passed."""
        if self.base == "DateTime":
            return f"datetime({x})"
        if self.base == "DateTime64":
            return f"strftime('%Y-%m-%d %H:%M:%f', {x})"
        if self.base == "Date":
            return f"date({x})"
        if self.base.startswith("Array("):
            return f"CASE WHEN {x} IS NULL OR {x} = 'null' THEN '[]' ELSE {x} END"
        return x

    def sql_json_type(self) -> str:
        return f"json_type(v, {_sql_str(self.sql_path)})"


def _possible_date(x: str) -> str:
    """SQL: the date ``YYYY-MM-DD`` exists. SQLite reads days up to 31 in any month
    (2021-02-30) and shifts them into the next month once a modifier applies."""
    return f"date({x}, '+0 days') = {x}"


def _possible_datetime(x: str) -> str:
    """SQL: ``YYYY-MM-DD[ T]HH:MM:SS`` exists; as :func:`_possible_date`, and SQLite
    reads 24:00:00 as the next day's midnight."""
    return f"datetime({x}, '+0 seconds') = replace({x}, 'T', ' ')"


@dataclasses.dataclass(frozen=True)
class Schema:
    """The columns of one data source and the statements derived from them."""

    name: str
    columns: tuple[Column, ...]

    @property
    def quarantine_name(self) -> str:
        """The documented quarantine data source: a view of :attr:`quarantine_table`."""
        return self.name + QUARANTINE_SUFFIX

    @property
    def quarantine_table(self) -> str:
        """Where quarantined rows are stored, with the row as received (``c__raw``)."""
        return QUARANTINE_TABLE_PREFIX + self.name

    def quarantine_view_statement(self) -> str:
        shown = ["c__error_column", "c__error", "c__import_id", *(c.name for c in self.columns), "insertion_date"]
        return (
            f"CREATE VIEW IF NOT EXISTS {quote_ident(self.quarantine_name)} AS SELECT "
            f"{', '.join(map(quote_ident, shown))} FROM {quote_ident(self.quarantine_table)}"
        )

    def types_by_table(self) -> dict[str, list[tuple[str, str]]]:
        """``{table: [(column, Tinybird type)]}`` for the data source and its quarantine,
        as /v0/sql shows them."""
        quarantine = [(n, QUARANTINE_COLUMN_TYPES[n]) for n in ("c__error_column", "c__error", "c__import_id")]
        quarantine += [(c.name, "Nullable(String)") for c in self.columns]
        quarantine.append(("insertion_date", QUARANTINE_COLUMN_TYPES["insertion_date"]))
        return {self.name: [(c.name, c.type) for c in self.columns], self.quarantine_name: quarantine}

    def to_json(self) -> list[dict[str, Any]]:
        return [c.to_json() for c in self.columns]

    @classmethod
    def from_json(cls, name: str, columns: Sequence[dict[str, Any]]) -> Schema:
        return cls(name=name, columns=tuple(Column.from_json(c) for c in columns))

    def create_statements(self) -> list[str]:
        cols = ", ".join(f"{quote_ident(c.name)} {c.affinity}" for c in self.columns)
        fixed = ", ".join(f"{quote_ident(c)} TEXT" for c in QUARANTINE_FIXED_COLUMNS)
        raw = "".join(f", {quote_ident(c.name)} TEXT" for c in self.columns)
        return [
            f"CREATE TABLE IF NOT EXISTS {quote_ident(self.name)} ({cols})",
            f"CREATE TABLE IF NOT EXISTS {quote_ident(self.quarantine_table)} ({fixed}{raw})",
            self.quarantine_view_statement(),
        ]

    def ok_expression(self) -> str:
        return " AND ".join(c.sql_check(f"x{i}") for i, c in enumerate(self.columns)) or "1"

    def _extracted(self, *, with_key: bool) -> str:
        """Rows of the JSON array ``?1`` with each column's value extracted once."""
        extracts = "".join(f", {c.sql_extract()} AS x{i}" for i, c in enumerate(self.columns))
        key = "key AS k, " if with_key else ""
        # LIMIT -1 keeps each subquery from being flattened into its parent, which
        # would evaluate the element text and the extractions once per reference.
        return (
            f"(SELECT {'k, ' if with_key else ''}v, instr(v, '\\u0000') AS z{extracts} "
            f"FROM (SELECT {key}value AS v FROM json_each(?1) LIMIT -1) LIMIT -1)"
        )

    def insert_statement(self) -> str:
        """Inserts the fitting rows of a JSON array (parameter 1) of objects."""
        names = ", ".join(quote_ident(c.name) for c in self.columns)
        values = ", ".join(c.sql_store(f"x{i}") for i, c in enumerate(self.columns))
        return (
            f"INSERT INTO {quote_ident(self.name)} ({names}) SELECT {values} "
            f"FROM {self._extracted(with_key=False)} WHERE {self.ok_expression()}"
        )

    def count_fitting_statement(self) -> str:
        """Counts the rows of a JSON array (parameter 1) that :meth:`insert_statement` stores."""
        return f"SELECT count(*) FROM {self._extracted(with_key=False)} WHERE {self.ok_expression()}"

    def misfits_statement(self) -> str:
        """Selects, for rows of the array that do not fit: index, text, then per column
        (fits, JSON type, raw value, holds ``\\u0000``)."""
        per_col = "".join(
            f", {c.sql_check(f'x{i}')}, {c.sql_json_type()}, x{i}, "
            + (c.sql_holds_nul() if c.base in _TEXT_BASES else "0")
            for i, c in enumerate(self.columns)
        )
        return f"SELECT k, v{per_col} FROM {self._extracted(with_key=True)} WHERE NOT ({self.ok_expression()})"

    def quarantine_insert_statement(self) -> str:
        names = list(QUARANTINE_FIXED_COLUMNS) + [c.name for c in self.columns]
        marks = ", ".join("?" for _ in names)
        return (
            f"INSERT INTO {quote_ident(self.quarantine_table)} "
            f"({', '.join(quote_ident(n) for n in names)}) VALUES ({marks})"
        )


# -- inference ---------------------------------------------------------------


def _scalar_kind(value: Any) -> str | None:
    """The column type of one JSON value, ``"null"``, or None when it cannot be a column."""
    if value is None:
        return "null"
    kind = type(value)
    if kind is bool:
        return "Bool"
    if kind is int:
        return "Int64" if -(2**63) <= value < 2**63 else "Float64"
    if kind is float:
        return "Float64"
    if kind is str:
        if len(value) <= 40:
            if _DATETIME_RE.match(value):
                return "DateTime"
            if _DATETIME64_RE.match(value):
                return "DateTime64"
            if _DATE_RE.match(value):
                return "Date"
        return "String"
    if kind is list:
        elem_kinds = set()
        for item in value:
            k = _scalar_kind(item)
            if k is None or k.startswith("Array(") or k == "null":
                return None
            elem_kinds.add("String" if k in ("Date", "DateTime", "DateTime64") else k)
        if not elem_kinds:
            return _EMPTY_ARRAY
        elem = _merge(elem_kinds)
        return f"Array({elem})" if elem in _ELEMENT_JSON_TYPES else None
    return None


def _merge(kinds: Iterable[str]) -> str:
    kinds = set(kinds) - {"null"}
    if _EMPTY_ARRAY in kinds:
        # An empty array says nothing about its elements.
        kinds.discard(_EMPTY_ARRAY)
        if not kinds:
            return "Array(String)"
        if not any(k.startswith("Array(") for k in kinds):
            return "String"
    if not kinds:
        return "String"
    if len(kinds) == 1:
        return next(iter(kinds))
    if kinds <= {"Int64", "Float64"}:
        return "Float64"
    if kinds <= {"Date", "DateTime"}:
        return "DateTime"
    if kinds <= {"Date", "DateTime", "DateTime64"}:
        return "DateTime64"
    if all(k.startswith("Array(") for k in kinds):
        elems = {k[6:-1] for k in kinds}
        merged = _merge(elems)
        return f"Array({merged})" if merged in _ELEMENT_JSON_TYPES else "Array(String)"
    return "String"


class _Acc:
    __slots__ = ("ignored", "kinds", "nulls", "seen")

    def __init__(self) -> None:
        self.kinds: set = set()
        self.seen = 0
        self.nulls = 0
        self.ignored = False


def _walk(obj: dict[str, Any], prefix: tuple[str, ...], accs: dict[tuple[str, ...], _Acc]) -> None:
    for key, value in obj.items():
        path = (*prefix, key)
        if type(value) is dict:
            if len(path) < MAX_FLATTEN_DEPTH:
                _walk(value, path, accs)
            continue
        acc = accs.get(path)
        if acc is None:
            if len(accs) >= MAX_COLUMNS * 2:
                continue
            acc = accs[path] = _Acc()
        kind = _scalar_kind(value)
        acc.seen += 1
        if kind is None:
            acc.ignored = True
        elif kind == "null":
            acc.nulls += 1
        else:
            acc.kinds.add(kind)


def _string_kinds(strings: list[str]) -> set:
    """``{_scalar_kind(s) for s in strings}``, mostly with a few matches over them all."""
    joined = "\n".join(strings) + "\n"
    if joined.count("\n") == len(strings):  # one string per line
        # The three date patterns begin alike: other strings are Strings.
        if not _DATE_PREFIX_LINE_RE.search(joined):
            return {"String"}
        if max(map(len, strings)) <= 40:
            for kind, lines_re in _DATE_KIND_LINES:
                if lines_re.fullmatch(joined):
                    return {kind}
    datelike = list(filter(_DATE_PREFIX_RE.match, strings))
    kinds = set(map(_scalar_kind, datelike))
    if len(datelike) < len(strings):
        kinds.add("String")
    return kinds


def _walk_flat(objects: Sequence[dict[str, Any]]) -> dict[tuple[str, ...], _Acc] | None:
    """What :func:`_walk` finds in every object, a key at a time, when all objects have
    the same keys and no nested object (most bodies); None otherwise."""
    if not objects:
        return None
    keys = objects[0].keys()
    if len(keys) > MAX_COLUMNS * 2 or not all(map(keys.__eq__, map(dict.keys, objects))):
        return None
    accs: dict[tuple[str, ...], _Acc] = {}
    for key in keys:
        values = list(map(dict.get, objects, repeat(key)))
        types = set(map(type, values))
        if dict in types:
            return None
        acc = accs[(key,)] = _Acc()
        acc.seen = len(values)
        kinds: set = set()
        for kind in types:
            same: list[Any] = values if len(types) == 1 else [v for v in values if type(v) is kind]
            if kind is type(None):
                acc.nulls = len(same)
            elif kind is bool:
                kinds.add("Bool")
            elif kind is float:
                kinds.add("Float64")
            elif kind is int and min(same) >= -(2**63) and max(same) < 2**63:
                kinds.add("Int64")
            elif kind is str:
                kinds.update(_string_kinds(same))
            else:
                kinds.update(map(_scalar_kind, same))
        if None in kinds:
            acc.ignored = True
            kinds.discard(None)
        acc.kinds = kinds
    return accs


def _column_name(path: tuple[str, ...]) -> str:
    name = re.sub(r"[^A-Za-z0-9_]", "_", "_".join(path))
    if not name or name[0].isdigit():
        name = "_" + name
    return name[:100]


def _paths(path: tuple[str, ...]) -> tuple[str, str] | None:
    """(Tinybird JSONPath, SQLite path), or None when SQLite cannot address the key."""
    tb, sql = "$", "$"
    for key in path:
        if not key or '"' in key or "\\" in key or "\x00" in key:
            return None
        if _IDENT_RE.match(key):
            tb += "." + key
            sql += "." + key
        else:
            tb += "['" + key.replace("'", "\\'") + "']"
            sql += '."' + key + '"'
    return tb, sql


def infer_schema(name: str, objects: Sequence[dict[str, Any]]) -> Schema:
    """Infers the columns of a new data source from its first events.

    A column is Nullable when any first event lacks it or holds null. Values whose
    types disagree widen (Int64+Float64 -> Float64, DateTime+DateTime64 ->
    DateTime64, anything else -> String). Arrays of objects or arrays, keys that
    SQLite paths cannot express, and objects nested deeper than 32 levels are not
    turned into columns (those fields are ignored, as unknown fields are).
    """
    accs = _walk_flat(objects)
    if accs is None:
        accs = {}
        for obj in objects:
            _walk(obj, (), accs)
    total = len(objects)
    columns: list[Column] = []
    used = {c.lower() for c in QUARANTINE_FIXED_COLUMNS}
    for path, acc in accs.items():
        if acc.ignored or len(columns) >= MAX_COLUMNS:
            continue
        paths = _paths(path)
        if paths is None:
            continue
        base = _merge(acc.kinds)
        col_name = _column_name(path)
        candidate, n = col_name, 1
        while candidate.lower() in used:
            n += 1
            candidate = f"{col_name}_{n}"
        used.add(candidate.lower())
        columns.append(
            Column(
                name=candidate,
                base=base,
                nullable=acc.nulls > 0 or acc.seen < total,
                jsonpath=paths[0],
                sql_path=paths[1],
            )
        )
    return Schema(name=name, columns=tuple(columns))
