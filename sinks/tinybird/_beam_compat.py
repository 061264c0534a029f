"""The one place where the Beam releases the sink supports differ (README, "Supported versions").

The sink has one code path from the floor of its range to the newest release;
what an API offers only on some releases is reached through here, with the
releases that need it named.
"""

from __future__ import annotations

import inspect
from typing import Any

from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.pvalue import DoOutputsTuple
from apache_beam.typehints.native_type_compatibility import convert_to_beam_type


def declare_tagged_types(outputs: DoOutputsTuple, **types: Any) -> DoOutputsTuple:
    """Gives tagged outputs of a multi-output ``ParDo`` their element types; returns ``outputs``.

    A typed output gets a cheap coder (Beam estimates the size of some elements
    with their coder, and pickling a full batch copies it). Beam 2.72 and later
    take tagged types as ``with_output_types(main, tag=hint)``; 2.70 and 2.71
    refuse the keyword. Setting each tagged ``PCollection``'s element type before it
    is consumed means the same thing to the runner on every release.
    """
    for tag, hint in types.items():
        # As with_output_types does: a builtin hint (tuple[...]) becomes Beam's own.
        outputs[tag].element_type = convert_to_beam_type(hint)
    return outputs


# Beam 2.71 and later; 2.70's get_all_options has no such argument.
_HAS_CURRENT_ONLY = "current_only" in inspect.signature(PipelineOptions.get_all_options).parameters


def option_values(options: PipelineOptions) -> dict[str, Any]:
    """The parsed values of the options that ``options``' own class defines, by name.

    From 2.71 only that class's arguments are parsed (``current_only``). On 2.70
    every registered options class's are: the same values for the names the
    class defines, plus others the caller does not read.
    """
    if _HAS_CURRENT_ONLY:
        return options.get_all_options(current_only=True)
    return options.get_all_options()
