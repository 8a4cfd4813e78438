"""How an fp32 update lands in bf16 weights (`--bf16-update`): nearest, stochastic or Kahan.

bf16 keeps 8 significant bits, so a weight w moves only when its update exceeds half its spacing
(2**-9 |w|, relative): with round-to-nearest, Adam's updates of lr ~ 1e-5 on weights ~ 1e-2 round to
nothing, step after step. Two remedies keep bf16 weights (2 bytes a weight, no fp32 master copy):

- stochastic: round up with probability equal to the discarded fraction, so E[round(x)] = x and
  small updates accumulate in expectation (Gupta et al. 2015, "Deep learning with limited numerical
  precision"; torchao's `bf16_stochastic_round`). No extra memory; the noise is seeded from
  (seed, parameter, step), so a resumed run draws the same noise and stays exact.
- kahan: a bf16 compensation buffer keeps what each rounding lost and adds it to the next update
  (Kahan summation, as in the optimi library's Kahan-compensated optimizers): deterministic, 2 more
  bytes a weight.
"""

from __future__ import annotations

import torch

from rrhf_fast.config import BF16_UPDATES  # noqa: F401  (the choices of --bf16-update)

_LOW_BITS = 1 << 16  # fp32 bits that bf16 drops
_HIGH_MASK = -(1 << 16)  # 0xFFFF0000 as an int32


def stochastic_round(x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """fp32 `x` rounded to bf16 up or down with the probabilities that make it unbiased.

    Adding 16 uniform random bits below bf16's last kept bit, then truncating, rounds the magnitude
    up exactly when the noise exceeds the discarded fraction: on the bit pattern, so the same holds
    for negative numbers (sign and magnitude). Non-finite values round to nearest (noise added to
    inf's pattern would make a NaN).
    """
    x = x.float().contiguous()
    noise = torch.randint(0, _LOW_BITS, x.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = ((x.view(torch.int32) + noise) & _HIGH_MASK).view(torch.float32).bfloat16()
    return torch.where(torch.isfinite(x), rounded, x.bfloat16())


ROUND_CHUNK = 1 << 24  # values rounded at a time: 64 MiB of int32 noise, not the tensor's size


def stochastic_round_into(
    out: torch.Tensor, x: torch.Tensor, generator: torch.Generator | None = None, chunk: int | None = None
) -> None:
    """`out` (bf16) = stochastic_round(`x`), `chunk` values at a time: the noise and intermediates of
    the rounding take about 16 bytes a value, which for Llama-3.1-8B's 525M-value embedding is ~8
    GiB at once (rrhf-fast plan); in chunks, 16 bytes a chunk value. Each value is rounded with the
    same rule and its own noise draw (the draws come from one generator in order), so the result
    is unbiased as before and a function of (seed, parameter, step). `chunk`: ROUND_CHUNK."""
    chunk = chunk or ROUND_CHUNK
    flat_out, flat_x = out.view(-1), x.reshape(-1)
    for start in range(0, flat_x.numel(), chunk):
        part = slice(start, start + chunk)
        flat_out[part].copy_(stochastic_round(flat_x[part], generator))


def kahan_round(
    old: torch.Tensor, new: torch.Tensor, compensation: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """bf16 weights moving from `old` (bf16) to `new` (fp32), with the compensation buffer (bf16)
    that carries what earlier roundings lost: returns (weights, compensation), both bf16."""
    base = old.float()
    wanted = (new - base) + compensation.float()
    weights = (base + wanted).bfloat16()
    return weights, (wanted - (weights.float() - base)).bfloat16()


def rounding_generator(device: torch.device, seed: int, index: int, step: int) -> torch.Generator:
    """The noise of parameter `index`'s `step`-th update: a pure function of its arguments, so a
    resumed run needs no saved generator state."""
    mixed = ((seed * 1_000_003 + index) * 1_000_033 + step) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(mixed)
