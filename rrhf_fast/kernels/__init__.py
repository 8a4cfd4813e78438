"""Fused kernels of rrhf-fast, importable as `rrhf_fast.kernels` (never as a bare `kernels`).

token_logprobs: per-token log-softmax gather straight from hidden states and the lm_head weight.
rrhf_loss: length-normalised response scores, pairwise hinge ranking loss and SFT loss, all queries
of a packed batch at once.

The public names load on first use (PEP 562): the config reads its flags' choices from
`rrhf_fast.kernels.constants`, and importing the package for that must not import triton.
"""

import importlib
import sys
import types

# public name -> the submodule that defines it
_SOURCES = {
    "RRHFOutput": "reference",
    "rrhf_loss_torch": "reference",
    "token_logprobs_torch": "reference",
    "rrhf_loss": "rrhf_loss",
    "token_logprobs": "token_logprobs",
}
__all__ = sorted(_SOURCES)


class _Kernels(types.ModuleType):
    """`rrhf_loss` and `token_logprobs` name both a function and the submodule defining it; the
    package attribute is the function (as when this file imported them eagerly), so the import
    system's binding of a freshly loaded submodule to its parent is declined here. The
    submodules stay reachable through sys.modules (importlib.import_module)."""

    def __getattr__(self, name: str):
        if name not in _SOURCES:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f"{self.__name__}.{_SOURCES[name]}"), name)
        super().__setattr__(name, value)
        return value

    def __setattr__(self, name: str, value) -> None:
        if not (isinstance(value, types.ModuleType) and _SOURCES.get(name) == name):
            super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(__all__))


sys.modules[__name__].__class__ = _Kernels
