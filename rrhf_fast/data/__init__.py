"""Data: reading scored records (`records`) and turning them into packed token batches (`packing`)."""

from rrhf_fast.data.records import Example, load_examples, load_examples_with_stats, write_examples

__all__ = ["Example", "load_examples", "load_examples_with_stats", "write_examples"]
