"""Beam YAML's form of routing by field: ``WriteToTinybird`` built from plain values.

A YAML ``PyTransform`` passes its ``kwargs`` as they are written, so it cannot
hold a Python callable for ``datasource``. :func:`WriteToTinybirdByField` takes
the field's name (and a prefix) instead and builds the sink with
:class:`~sinks.tinybird.DatasourceFromField`.
"""

from __future__ import annotations

import re
from typing import Any

from sinks.tinybird._routing import DatasourceFromField
from sinks.tinybird._transform import WriteToTinybird

__all__ = ["WriteToTinybirdByField"]

# The start of a data source name, leaving room for at least one character of the field's value.
_PREFIX = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,98}")


# Named as the transform it builds (a YAML constructor reads as a transform name).
def WriteToTinybirdByField(*, datasource_field: str, datasource_prefix: str = "", **kwargs: Any) -> WriteToTinybird:
    """``WriteToTinybird(datasource=DatasourceFromField(datasource_field, prefix=datasource_prefix), **kwargs)``.

    For Beam YAML::

        - type: PyTransform
          config:
            constructor: sinks.tinybird.WriteToTinybirdByField
            kwargs:
              datasource_field: type        # {"type": "click", ...} goes to events_click
              datasource_prefix: events_
              api_url: https://api.tinybird.co

    Args:
        datasource_field: The field of each element that names its data source.
        datasource_prefix: Put before the field's value. Default ``""``.
        **kwargs: Every other argument of :class:`~sinks.tinybird.WriteToTinybird`
            (not ``datasource``).

    Raises:
        TypeError: ``datasource`` is among ``kwargs``.
        ValueError: ``datasource_field`` is empty, ``datasource_prefix`` cannot
            start a data source name, or another argument is refused by the sink.
    """
    if "datasource" in kwargs:
        raise TypeError("WriteToTinybirdByField takes datasource_field (and datasource_prefix), not datasource")
    if datasource_prefix and not _PREFIX.fullmatch(str(datasource_prefix)):
        # Checked here, not per element: a bad prefix would make every element unroutable.
        raise ValueError(f"datasource_prefix must be letters, digits and _, not starting with a digit, at most "
                         f"99 characters, got {datasource_prefix!r}")
    return WriteToTinybird(datasource=DatasourceFromField(datasource_field, prefix=datasource_prefix), **kwargs)
