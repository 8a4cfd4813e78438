"""What every caller does to a model before using it: look inside a peft wrapper, switch to eval mode."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any


def unwrap(model: Any) -> Any:
    """The transformers model inside a peft wrapper (LoRA layers stay injected in it); else `model`."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


@contextlib.contextmanager
def eval_mode(model: Any) -> Iterator[Any]:
    """`model` in eval mode (no dropout) for the block, then back to the mode it was in, even on error."""
    was_training = model.training
    model.eval()
    try:
        yield model
    finally:
        model.train(was_training)
