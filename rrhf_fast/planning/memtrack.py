"""Live tensor memory by category over a training step: a dispatch-mode tracker for real and fake tensors.

Every op's output storages are recorded when they first appear and dropped when their storage is
freed (a weak reference's callback), so the tracker knows the bytes alive at each allocation and
their peak, on real CPU tensors as on `FakeTensorMode` tensors (which hold no memory). It is
torch's `MemTracker` idea (torch.distributed._tools.mem_tracker) reduced to what a plan needs, with
one addition: the fused kernels are custom ops, opaque to a dispatch mode, so their bodies (the
launcher on real tensors, the fake kernel on fake ones) run with the tracker still on top, which
then sees their workspace buffers too.

Categories: weights (registered before the step), gradients (a parameter's .grad, moved there when
it is accumulated), optimizer (allocated during the optimizer step: its states, and the step's own
short-lived temporaries), weight_copies (a weight cast to another dtype during forward or backward:
autocast's bf16 copies of fp32 weights, which it caches until its region exits, so they grow with
the model, not with the tokens), activations (allocated during forward and still alive: what grows
with the tokens), temporaries (allocated during backward and not a gradient or a weight copy:
recomputed activations under checkpointing, activation gradients, kernel workspaces).
"""

from __future__ import annotations

import contextlib
import weakref
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch._subclasses.fake_tensor import FakeTensor
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CATEGORIES = ("weights", "gradients", "optimizer", "weight_copies", "activations", "temporaries")
# ops that cast a tensor to another dtype: autocast's casts reach the dispatcher as _to_copy
_CASTS = {torch.ops.aten._to_copy.default, torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout}
_COPY_PHASES = ("forward", "backward")
HOST = "host "  # the prefix of a host-memory category in MemoryTracker.live
PHASE_CATEGORY = {
    "setup": "weights",
    "forward": "activations",
    "backward": "temporaries",
    "clip": "temporaries",
    "optimizer": "optimizer",
    "optimizer in backward": "optimizer",  # --optim-in-backward: a parameter's update inside backward
}


@dataclass
class Allocation:
    shape: tuple[int, ...]
    dtype: torch.dtype
    nbytes: int
    phase: str


@dataclass
class MemoryReport:
    peak_bytes: int
    peak_phase: str
    by_category: dict[str, int]  # each category's largest value over the step
    at_peak: dict[str, int]  # the categories' values at the peak
    allocations: list[Allocation] = field(default_factory=list)
    # each phase's own peak and the categories there: plan_step extrapolates them one by one
    phase_peaks: dict[str, tuple[int, dict[str, int]]] = field(default_factory=dict)
    # host memory (--offload-optimizer): its peak and each category's largest value; not in the above
    host_peak_bytes: int = 0
    host_by_category: dict[str, int] = field(default_factory=dict)
    trainable_params: int = 0


class MemoryTracker(TorchDispatchMode):
    """`with MemoryTracker() as mt:` ... `mt.phase = "backward"` ... `mt.report()`."""

    def __init__(self, inline: dict[Any, tuple[Callable, Callable]] | None = None, record: bool = False):
        super().__init__()
        # op overload -> (real body, fake body): run with the tracker on top to see their buffers.
        self.inline = dict(inline or {})
        self.record = record
        self.phase = "forward"
        self.live: dict[int, tuple[int, str]] = {}  # storage id -> (bytes, category)
        self._refs: dict[int, weakref.ref] = {}
        self.current: Counter[str] = Counter()
        self.largest: Counter[str] = Counter()
        self.total = self.peak = 0
        self.peak_phase = "setup"
        self.at_peak: dict[str, int] = {}
        self.phase_peaks: dict[str, tuple[int, dict[str, int]]] = {}
        self.allocations: list[Allocation] = []
        self.host_category: str | None = None  # set: what is allocated now is host memory of this kind
        self.host_current: Counter[str] = Counter()
        self.host_largest: Counter[str] = Counter()
        self.host_total = self.host_peak = 0

    @contextlib.contextmanager
    def on_host(self, category: str) -> Iterator[None]:
        """What is allocated inside lives in host memory, counted as `category` there."""
        old, self.host_category = self.host_category, category
        try:
            yield
        finally:
            self.host_category = old

    # -- bookkeeping -----------------------------------------------------------------------------

    def track(self, tensor: torch.Tensor, category: str | None = None, nbytes: int | None = None) -> None:
        """Count `tensor`'s storage (if new) under `category` (default: the phase's); `nbytes` stands
        for the storage's size where the real one differs (a quantised weight simulated unquantised)."""
        if not _strided(tensor):
            return
        storage = tensor.untyped_storage()
        key = id(storage)
        if key in self.live:
            return
        nbytes = storage.nbytes() if nbytes is None else nbytes
        if self.host_category is not None:
            category = HOST + (category or self.host_category)
        cat = category or PHASE_CATEGORY[self.phase]
        self.live[key] = (nbytes, cat)
        self._refs[key] = weakref.ref(storage, lambda _ref, key=key: self._free(key))
        if self.record:
            self.allocations.append(Allocation(tuple(tensor.shape), tensor.dtype, nbytes, self.phase))
        self._add(cat, nbytes)

    def recategorize(self, tensor: torch.Tensor, category: str) -> None:
        """Move a tracked storage to `category` (a gradient once it is a parameter's .grad)."""
        key = id(tensor.untyped_storage())
        if key not in self.live:
            return self.track(tensor, category)
        nbytes, old = self.live[key]
        if old != category:
            self.live[key] = (nbytes, category)
            self.current[old] -= nbytes
            self.total -= nbytes
            self._add(category, nbytes)

    def _add(self, cat: str, nbytes: int) -> None:
        if cat.startswith(HOST):
            cat = cat.removeprefix(HOST)
            self.host_current[cat] += nbytes
            self.host_total += nbytes
            self.host_largest[cat] = max(self.host_largest[cat], self.host_current[cat])
            self.host_peak = max(self.host_peak, self.host_total)
            return
        self.current[cat] += nbytes
        self.total += nbytes
        self.largest[cat] = max(self.largest[cat], self.current[cat])
        if self.total > self.phase_peaks.get(self.phase, (-1,))[0]:
            self.phase_peaks[self.phase] = (self.total, {c: self.current[c] for c in CATEGORIES})
        if self.total > self.peak:
            self.peak, self.peak_phase = self.total, self.phase
            self.at_peak = {c: self.current[c] for c in CATEGORIES}

    def _free(self, key: int) -> None:
        entry = self.live.pop(key, None)
        self._refs.pop(key, None)
        if entry is not None and entry[1].startswith(HOST):
            self.host_current[entry[1].removeprefix(HOST)] -= entry[0]
            self.host_total -= entry[0]
        elif entry is not None:
            self.current[entry[1]] -= entry[0]
            self.total -= entry[0]

    def report(self) -> MemoryReport:
        return MemoryReport(
            peak_bytes=self.peak,
            peak_phase=self.peak_phase,
            by_category={c: int(self.largest[c]) for c in CATEGORIES},
            at_peak={c: int(self.at_peak.get(c, 0)) for c in CATEGORIES},
            allocations=list(self.allocations),
            phase_peaks=dict(self.phase_peaks),
            host_peak_bytes=self.host_peak,
            host_by_category={c: int(self.host_largest[c]) for c in self.host_largest},
        )

    # -- dispatch --------------------------------------------------------------------------------

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        bodies = self.inline.get(func)
        if bodies is not None:
            fake = any(isinstance(a, FakeTensor) for a in tree_flatten((args, kwargs))[0])
            with self:
                out = bodies[1 if fake else 0](*args, **kwargs)
        else:
            out = func(*args, **kwargs)
        # An output on an input's storage (a view, an in-place or out= op) is no new memory, also
        # when the input predates the tracker.
        inputs = {id(t.untyped_storage()) for t in tree_flatten((args, kwargs))[0] if _strided(t)}
        category = self._copy_of_weight(func, args)
        for t in tree_flatten(out)[0]:
            if _strided(t) and id(t.untyped_storage()) not in inputs:
                self.track(t, category)
        return out

    def _copy_of_weight(self, func: Any, args: tuple) -> str | None:
        """ "weight_copies" when `func` casts a weight (a tracked "weights" storage) in forward or
        backward, else None (the phase's category)."""
        if func not in _CASTS or self.phase not in _COPY_PHASES or not args or not _strided(args[0]):
            return None
        entry = self.live.get(id(args[0].untyped_storage()))
        return "weight_copies" if entry is not None and entry[1] == "weights" else None


def _strided(t: Any) -> bool:
    return isinstance(t, torch.Tensor) and t.layout == torch.strided


def watch_gradients(tracker: MemoryTracker, params: list[torch.nn.Parameter]) -> list[Any]:
    """Count each parameter's .grad as a gradient once it is accumulated; returns the hook handles."""

    def hook(p: torch.Tensor) -> None:
        if p.grad is not None:
            tracker.recategorize(p.grad, "gradients")

    return [p.register_post_accumulate_grad_hook(hook) for p in params if p.requires_grad]
