"""rrhf-fast: RRHF alignment of Hugging Face causal LMs, fast and on small GPUs.

The Python API (docs/api.md) is this package's names, loaded on first use (PEP 562):
every command's flags come from `rrhf_fast.config`, and importing the package for that must not
import torch, triton or transformers (tests/test_imports.py). tests/api_snapshot.json pins each
name's signature, so that a change to one is deliberate.

The flat modules of the first layout (`rrhf_fast.packing`, `rrhf_fast.model`, `rrhf_fast.train`,
...) and the modules that left `rrhf_fast.training` for their own rooms (`rrhf_fast.training.plan`,
...) still import, as the modules that replaced them, with a DeprecationWarning naming the new path;
they go in the next release. `rrhf_fast.train`, the attribute, is the `train` function:
`from rrhf_fast.train import train` keeps working, `import rrhf_fast.train as m` gives the function.
"""

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings

__version__ = "0.1.0"

# public name -> the module that defines it
_EXPORTS = {
    # kernels: usable without our trainer (docs/DESIGN.md §6)
    "token_logprobs": "rrhf_fast.kernels",
    "rrhf_loss": "rrhf_fast.kernels",
    "RRHFOutput": "rrhf_fast.kernels",
    "token_logprobs_torch": "rrhf_fast.kernels",
    "rrhf_loss_torch": "rrhf_fast.kernels",
    # data and the packed batch (§2, §3)
    "Example": "rrhf_fast.data.records",
    "load_examples": "rrhf_fast.data.records",
    "write_examples": "rrhf_fast.data.records",
    "TokenizedExample": "rrhf_fast.data.packing",
    "PackedBatch": "rrhf_fast.data.packing",
    "tokenize_example": "rrhf_fast.data.tokenize",
    "pack": "rrhf_fast.data.packing",
    "pack_tokenized": "rrhf_fast.data.packing",
    "packed_logprobs": "rrhf_fast.models.logprobs",
    # each loss's function (§4): rrhf_loss above
    "dpo_loss": "rrhf_fast.objectives.dpo",
    "DPOOutput": "rrhf_fast.objectives.dpo",
    "reward_loss": "rrhf_fast.objectives.reward",
    "RewardLossOutput": "rrhf_fast.objectives.reward",
    "lists_of": "rrhf_fast.objectives.ranking",  # the ranking losses' [G, K] inputs from the packed order
    "Lists": "rrhf_fast.objectives.ranking",
    "list_inputs": "rrhf_fast.objectives.ranking",
    "ListInputs": "rrhf_fast.objectives.ranking",
    "RankingOutput": "rrhf_fast.objectives.ranking",
    "dpo_pl_loss": "rrhf_fast.objectives.listwise",
    "lipo_loss": "rrhf_fast.objectives.listwise",
    "pro_loss": "rrhf_fast.objectives.listwise",
    "simpo_loss": "rrhf_fast.objectives.pairwise",
    "orpo_loss": "rrhf_fast.objectives.pairwise",
    # a training run from code
    "TrainConfig": "rrhf_fast.config",
    "train": "rrhf_fast.training.train",
    "TrainResult": "rrhf_fast.training.train",
    "UserError": "rrhf_fast.errors",
}
__all__ = ["__version__", *sorted(_EXPORTS)]

# old module, relative to the package (the flat layout before the stage packages, and training/ before
# its rooms) -> where it lives now
MOVED_MODULES = {
    "attention": "rrhf_fast.models.attention",
    "beam_search": "rrhf_fast.generation.beam_search",
    "checkpoint": "rrhf_fast.checkpointing.checkpoint",
    "demo": "rrhf_fast.pipelines.demo",
    "demo_online": "rrhf_fast.pipelines.demo_online",
    "distributed": "rrhf_fast.parallel.distributed",
    "dpo": "rrhf_fast.objectives.dpo",
    "evaluate": "rrhf_fast.training.evaluate",
    "iterate": "rrhf_fast.pipelines.iterate",
    "labelers": "rrhf_fast.generation.labelers",
    "loading": "rrhf_fast.models.loading",
    "merge": "rrhf_fast.checkpointing.merge",
    "model": "rrhf_fast.models.logprobs",
    "optim": "rrhf_fast.optimizers.optim",
    "packing": "rrhf_fast.data.packing",
    "plot": "rrhf_fast.reporting.plot",
    "provenance": "rrhf_fast.checkpointing.provenance",
    "resume": "rrhf_fast.checkpointing.resume",
    "sample": "rrhf_fast.generation.sample",
    "score": "rrhf_fast.generation.score",
    "tiny": "rrhf_fast.models.tiny",
    "train": "rrhf_fast.training.train",
    # training/ split into rooms (docs/DESIGN.md, layout): the loop stayed, the rest moved
    "training.backward": "rrhf_fast.step.backward",
    "training.bf16_update": "rrhf_fast.optimizers.bf16_update",
    "training.checkpoint": "rrhf_fast.checkpointing.checkpoint",
    "training.distributed": "rrhf_fast.parallel.distributed",
    "training.fit_check": "rrhf_fast.planning.fit_check",
    "training.in_backward": "rrhf_fast.optimizers.in_backward",
    "training.memtrack": "rrhf_fast.planning.memtrack",
    "training.merge": "rrhf_fast.checkpointing.merge",
    "training.model_card": "rrhf_fast.reporting.model_card",
    "training.offload": "rrhf_fast.optimizers.offload",
    "training.optim": "rrhf_fast.optimizers.optim",
    "training.paramwise": "rrhf_fast.optimizers.paramwise",
    "training.plan": "rrhf_fast.planning.plan",
    "training.plan_cuda": "rrhf_fast.planning.plan_cuda",
    "training.plot": "rrhf_fast.reporting.plot",
    "training.provenance": "rrhf_fast.checkpointing.provenance",
    "training.resume": "rrhf_fast.checkpointing.resume",
    "training.run_state": "rrhf_fast.checkpointing.run_state",
    "training.rundir": "rrhf_fast.checkpointing.rundir",
    "training.safe_dcp": "rrhf_fast.parallel.safe_dcp",
    "training.simulate": "rrhf_fast.planning.simulate",
    "training.steps": "rrhf_fast.step.steps",
    "training.tracking": "rrhf_fast.reporting.tracking",
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Imports `rrhf_fast.OLD` as the module that replaced it (the same object), with a warning."""

    def __init__(self) -> None:
        self._specs: dict[str, importlib.machinery.ModuleSpec] = {}

    def find_spec(self, fullname, path=None, target=None):
        package, _, old = fullname.partition(".")
        if package == __name__ and old in MOVED_MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec):
        new = MOVED_MODULES[spec.name.partition(".")[2]]
        # stacklevel 2: the import line (warnings skips the import system's own frames)
        warnings.warn(f"{spec.name} moved to {new}; import it from there ({spec.name} goes in the next "
                      "release)", DeprecationWarning, stacklevel=2)  # fmt: skip
        module = importlib.import_module(new)
        self._specs[spec.name] = module.__spec__  # the import system stamps the alias's spec on it
        return module

    def exec_module(self, module):
        """Nothing to run: the module is the new one, already loaded; it keeps its own spec."""
        module.__spec__ = self._specs.pop(module.__spec__.name)


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())


class _Package(types.ModuleType):
    """The exports load on first use; `train` stays the function when the old module
    `rrhf_fast.train` is imported (the import system would bind the module over it)."""

    def __getattr__(self, name: str):
        if name not in _EXPORTS:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(_EXPORTS[name]), name)
        super().__setattr__(name, value)
        return value

    def __setattr__(self, name: str, value) -> None:
        if not (name in _EXPORTS and isinstance(value, types.ModuleType)):
            super().__setattr__(name, value)

    def __dir__(self) -> list[str]:
        return sorted(set(super().__dir__()) | set(__all__))


sys.modules[__name__].__class__ = _Package
