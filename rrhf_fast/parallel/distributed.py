"""Multi-GPU training under torchrun: the process group, DDP or FSDP2 around the packed forward, and
the few collectives the training loop and the checkpoints need.

`torchrun --nproc_per_node N -m rrhf_fast.cli train ...` runs the same command on N processes.
Every rank plans the same steps (a pure function of seed, epoch and flags) and takes the
micro-batches `step[rank::world]` of each; the loss stays divided by the step's *global* query
count, and since DDP and FSDP2 average gradients over ranks, each rank's loss is multiplied by the
world size: the update equals the one-process update with the same micro-batches accumulated.

Wrapping: DDP hooks the backward and FSDP2 all-gathers sharded parameters only when the forward
goes through the wrapped module, while `packed_logprobs` calls the decoder and then reads the
lm_head weight itself. So the wrapped module is `model.PackedLogprobs`, whose forward is the whole
packed_logprobs: inside it the root parameters (embeddings, final norm, lm_head) are whole tensors.
FSDP2 shards each decoder layer, then that root.
"""

from __future__ import annotations

import contextlib
import inspect
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as tdist

from rrhf_fast.errors import UserError
from rrhf_fast.models.loading import resolve_device
from rrhf_fast.models.logprobs import PackedLogprobs
from rrhf_fast.models.wrapping import unwrap


@dataclass(frozen=True)
class Dist:
    """This process's place: rank 0 of 1 unless launched by torchrun."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return tdist.is_available() and tdist.is_initialized()


def init(device_flag: str, fsdp: bool = False) -> tuple[Dist, torch.device]:
    """Read torchrun's RANK / WORLD_SIZE / LOCAL_RANK and join the process group (nccl on CUDA, gloo
    on CPU); without them, one process and no group. Returns this rank's place and device."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        if fsdp:
            raise UserError("--fsdp shards over the processes of torchrun: launch with "
                            "`torchrun --nproc_per_node N -m rrhf_fast.cli train ...`")  # fmt: skip
        return Dist(), resolve_device(device_flag)
    dist = Dist(int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0)))
    device = resolve_device(device_flag, local_rank=dist.local_rank)
    if not dist.active:
        if device.type == "cuda":
            torch.cuda.set_device(device)
            tdist.init_process_group("nccl", device_id=device)
        else:
            tdist.init_process_group("gloo")
    return dist, device


def shutdown() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.destroy_process_group()


def wrap(model: Any, dist: Dist, fsdp: bool, unit: Callable[[Any], torch.nn.Module] = PackedLogprobs) -> Any:
    """What the loop runs the forward through: FSDP2 or DDP around `unit(model)` (the module whose
    forward is the objective's whole forward, Objective.packed_module), or `model` itself in a
    single process. `model` keeps its own (now sharded, under FSDP2) parameters."""
    if fsdp:
        from torch.distributed.fsdp import fully_shard

        module = unit(model)
        for layer in decoder_layers(model):
            fully_shard(layer)
        fully_shard(module)
        return module
    if dist.world > 1:
        from torch.nn.parallel import DistributedDataParallel

        # device_ids=None: packed_logprobs moves the batch itself (a dataclass DDP would copy).
        # No buffer sync in each forward: the only buffers are rotary tables, equal on every rank,
        # and evaluation (no backward) must not wait on the other ranks. gradient_as_bucket_view:
        # each .grad is a view into DDP's all-reduce buckets, not a second copy of every gradient
        # beside them (4 bytes a weight for fp32 full fine-tuning: 30 GiB for an 8B model), so a
        # rank holds what `rrhf-fast plan` counts for one process.
        params = inspect.signature(DistributedDataParallel.__init__).parameters
        no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": False}
        return DistributedDataParallel(unit(model), device_ids=None, gradient_as_bucket_view=True, **no_sync)
    return model


def decoder_layers(model: Any) -> list[torch.nn.Module]:
    base = unwrap(model)
    layers = getattr(base.get_decoder(), "layers", None)
    if layers is None:
        raise UserError(f"--fsdp: cannot find the decoder layers of {type(base).__name__} to shard")
    return list(layers)


def my_microbatches(step: list[list[int]], dist: Dist) -> tuple[list[list[int]], int]:
    """This rank's micro-batches of a step and how many of them are its own (the rest are fillers).

    Every rank runs the same number of forward/backward passes (FSDP2 all-gathers in each, and
    DDP's last backward all-reduces): a rank short of one repeats the step's smallest micro-batch,
    which then trains with weight zero.
    """
    mine = step[dist.rank :: dist.world]
    count = -(-len(step) // dist.world)
    filler = min(step, key=len)
    return mine + [filler] * (count - len(mine)), len(mine)


@contextlib.contextmanager
def gradient_sync(module: Any, enabled: bool) -> Iterator[None]:
    """Around a micro-batch's forward and backward: all-reduce (or reduce-scatter) gradients only
    on the step's last one, as DDP's no_sync() / FSDP2's set_requires_gradient_sync intend."""
    if enabled or not (hasattr(module, "no_sync") or hasattr(module, "set_requires_gradient_sync")):
        yield
    elif hasattr(module, "no_sync"):
        with module.no_sync():
            yield
    else:
        module.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            module.set_requires_gradient_sync(True)


def sum_over_ranks(values: list[float], device: torch.device) -> list[float]:
    """Element-wise sums over every rank (fp64), or `values` unchanged in a single process."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return list(values)
    on = device if tdist.get_backend() == "nccl" else torch.device("cpu")
    tensor = torch.tensor(values, dtype=torch.float64, device=on)
    tdist.all_reduce(tensor)
    return tensor.tolist()


def local_value(value: Any) -> Any:
    """A DTensor (e.g. clip_grad_norm_'s total norm under FSDP2) as an ordinary tensor."""
    from torch.distributed.tensor import DTensor

    return value.full_tensor() if isinstance(value, DTensor) else value


def barrier() -> None:
    if tdist.is_available() and tdist.is_initialized():
        tdist.barrier()


def broadcast(obj: Any) -> Any:
    """Rank 0's `obj` on every rank (a picklable Python object)."""
    if not (tdist.is_available() and tdist.is_initialized()):
        return obj
    box = [obj]
    tdist.broadcast_object_list(box, src=0)
    return box[0]


# -------------------------------------------------------------------------------------------------
# FSDP2 checkpoints: whole weights for save_pretrained, sharded optimizer states


def gather_weights(model: Any, dist: Dist) -> dict[str, torch.Tensor]:
    """The weights save_pretrained writes, whole, on rank 0's CPU (empty elsewhere); every rank must
    call it. A LoRA model gathers only its trainable (adapter) weights: the base is never saved."""
    from torch.distributed.tensor import DTensor

    adapter = hasattr(model, "peft_config")
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    out = {}
    for name, value in model.state_dict().items():
        if adapter and name not in trainable:
            continue
        whole = value.full_tensor() if isinstance(value, DTensor) else value
        if dist.main:
            out[name] = whole.detach().cpu()
    return out


def save_sharded_optimizer(model: Any, optimizer: torch.optim.Optimizer, directory: Any) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    from rrhf_fast.parallel.safe_dcp import write_metadata

    metadata = dcp.save({"optimizer": get_optimizer_state_dict(model, optimizer)}, checkpoint_id=directory)
    if not tdist.is_initialized() or tdist.get_rank() == 0:
        write_metadata(metadata, directory)  # what loading reads instead of the pickled .metadata


def load_sharded_optimizer(model: Any, optimizer: torch.optim.Optimizer, directory: Any) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    from rrhf_fast.parallel.safe_dcp import SafePlanner, SafeReader

    target = {"optimizer": get_optimizer_state_dict(model, optimizer)}
    reader = SafeReader(directory)  # never DCP's default reader and planner: both unpickle
    try:
        dcp.load(target, storage_reader=reader, planner=SafePlanner())
    except (Exception, dcp.api.CheckpointException) as err:  # a BaseException wrapping each rank's error
        causes = [pair[0] for pair in getattr(err, "failures", {}).values()] or [err]
        ours = [e for e in causes if isinstance(e, UserError)]
        if ours:
            raise ours[0] from None
        text = str(causes[0]).strip()
        first = text.splitlines()[0][:200] if text else type(causes[0]).__name__
        raise UserError(
            f"{directory}: the sharded optimizer state does not fit this model and --optim ({first}); "
            "resume with the flags of the run that wrote it"
        ) from None
    set_optimizer_state_dict(model, optimizer, target["optimizer"])
