"""Data: reading scored records (`records`) and turning them into packed token batches (`packing`)."""

import warnings

from rrhf_fast.data import records
from rrhf_fast.data.records import Example, load_examples, load_examples_with_stats, write_examples

__all__ = ["Example", "load_examples", "load_examples_with_stats", "write_examples"]
# Names the module rrhf_fast.data had before it became this package (now rrhf_fast.data.records).
_MOVED = ("LoadStats", "write_text_atomically")


def __getattr__(name: str):
    if name in _MOVED:
        new = f"rrhf_fast.data.records.{name}"
        warnings.warn(f"rrhf_fast.data.{name} moved to {new}; import it from there (the old path goes in the "
                      "next release)", DeprecationWarning, stacklevel=2)  # fmt: skip
        globals()[name] = getattr(records, name)  # once: `from ... import` looks a name up twice
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
