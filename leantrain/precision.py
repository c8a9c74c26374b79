"""``--dtype`` and ``--bf16-update``: pure low-precision training with a compensated bf16 update.

Pure bf16 means weights, activations and gradients are bf16 and there is no fp32 master copy. Adding an update
smaller than half a bf16 ulp (2^-8 relative) to a bf16 weight with round-to-nearest loses it, so AdamW at small
learning rates stalls. Two compensations, chosen by ``--bf16-update``:

* ``stochastic``: the fp32 result of the update is rounded to bf16 up or down with probability proportional to
  the distance (unbiased). The random bits come from a generator seeded by (``--seed``, the parameter's position,
  its update count), the count living in the optimizer state, so DDP ranks round alike and resume is bit-exact
  without saving a generator. No extra memory per parameter.
* ``kahan``: the part of the fp32 result that bf16 cannot hold is kept in a bf16 compensation buffer per parameter
  (optimizer state key ``bf16_compensation``, saved in checkpoints) and added back before the next update: the
  weight is effectively bf16 + bf16 (~16 significant bits). 2 bytes per parameter.
* ``plain``: the optimizer's own round-to-nearest (no wrapper).

Where: :class:`CompensatedOptimizer`, one wrapper every optimizer goes through (leantrain's BlockOptimizer family
and torch's), applied by the run assembly before a method's own wrapper (DLRT's KLS calls it as its inner
optimizer). It steps one parameter at a time on an fp32 copy of that parameter (and its gradient), then writes
the compensated bf16 result back -- so the transient fp32 memory is one parameter, not the model. The natural
place would be BlockOptimizer's write-back (``p.copy_(pflat)`` / ``project_back_add_``), where the fp32 value
already exists; a ``_store(p, fp32_value, state)`` hook there would save the copy. State stays in the inner
optimizer's ``state`` dict (same ``state_dict`` format, extra keys only).

Pure fp16 underflows without fp32 master weights: ``--dtype fp16`` is refused unless ``--master-weights fp32``
(leantrain/mixed.py: autocast with a loss scaler). Scratch LMs are built directly in the dtype
(leantrain/meta_init.py); :func:`cast_model` casts what arrives in fp32 (loaded encoders, a fresh head).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from .optim.projector import SUPPLIED_GRAD

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
BF16_UPDATES = ("stochastic", "kahan", "plain")
COMPENSATION_KEY = "bf16_compensation"
ROUNDS_KEY = "bf16_rounds"  # how many compensated updates a parameter has had: seeds its stochastic rounding
LOW_MASK = 0xFFFF  # the 16 mantissa bits fp32 has and bf16 lacks
SEED_STRIDE = 1_000_003  # mixes (seed, parameter position, round) into one generator seed


def torch_dtype(name: str) -> torch.dtype:
    """The torch dtype of a ``--dtype`` name."""
    return DTYPES[name]


def cast_model(model: nn.Module, name: str) -> nn.Module:
    """Cast floating parameters to ``--dtype`` (fp32: untouched, so default runs stay bit-identical).

    Buffers keep their dtype: rotary inverse frequencies stay fp32, as transformers keeps them when it loads a
    model in bf16 (rounding them to bf16 would shift every position's angle). Scratch LMs arrive already in the
    dtype (leantrain/meta_init.py); this casts loaded encoders and any fresh head."""
    if name != "fp32":
        dtype = DTYPES[name]
        for p in model.parameters():
            if p.is_floating_point() and p.dtype != dtype:
                p.data = p.data.to(dtype)
    return model


def stochastic_round(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """Round fp32 ``x`` to bf16 up or down with probability proportional to the distance: E[result] = x.

    Adds uniform random bits below bf16's mantissa to the fp32 bit pattern and truncates them; inf and NaN stay
    (their low bits are zero or irrelevant). ``generator`` makes it reproducible."""
    bits = x.detach().float().contiguous().view(torch.int32)
    noise = torch.randint(0, LOW_MASK + 1, bits.shape, dtype=torch.int32, device=x.device, generator=generator)
    rounded = (bits + noise) & ~LOW_MASK
    return rounded.view(torch.float32).to(torch.bfloat16)


def round_generator(seed: int, position: int, count: int, device: torch.device) -> torch.Generator:
    """A generator that depends only on (seed, parameter position, update count): stateless, rank-independent."""
    gen = torch.Generator(device=device)
    gen.manual_seed(((seed * SEED_STRIDE + position) * SEED_STRIDE + count) % (1 << 63))
    return gen


@contextmanager
def _standing_in(optimizer: torch.optim.Optimizer, p: Tensor, work: Tensor) -> Iterator[None]:
    """``work`` (an fp32 copy of bf16 ``p``, with its gradient) takes ``p``'s place in the optimizer's param group
    and state for one step. Swapping ``p.data`` to fp32 instead would make autograd drop ``p``'s gradient
    accumulator -- and with it the hooks DDP hangs on it: every later step would skip the all-reduce."""
    group = next(g for g in optimizer.param_groups if any(q is p for q in g["params"]))
    index = next(i for i, q in enumerate(group["params"]) if q is p)
    group["params"][index] = work
    if p in optimizer.state:
        optimizer.state[work] = optimizer.state.pop(p)
    try:
        yield
    finally:
        group["params"][index] = p
        if work in optimizer.state:
            optimizer.state[p] = optimizer.state.pop(work)


class CompensatedOptimizer(torch.optim.Optimizer):
    """Steps ``inner`` on fp32 copies of its bf16 parameters, one at a time, and rounds back with compensation.

    Shares ``param_groups`` and ``state`` with ``inner`` (schedules, checkpoints and DLRT's KLS act on them
    directly); ``state_dict`` is the inner one's. Parameters that are not bf16 are stepped by ``inner`` as is."""

    def __init__(self, inner: torch.optim.Optimizer, mode: str, seed: int) -> None:
        if mode not in ("stochastic", "kahan"):
            raise ValueError(f"CompensatedOptimizer: mode={mode!r} must be 'stochastic' or 'kahan'")
        self.inner, self.mode, self.seed = inner, mode, seed
        self.param_groups = inner.param_groups
        self.state = inner.state  # type: ignore[assignment]
        self.defaults = inner.defaults
        self._optimizer_step_pre_hooks = {}  # torch's hook registries, unused here
        self._optimizer_step_post_hooks = {}
        self._optimizer_state_dict_pre_hooks = {}
        self._optimizer_state_dict_post_hooks = {}
        self._optimizer_load_state_dict_pre_hooks = {}
        self._optimizer_load_state_dict_post_hooks = {}

    def __getattr__(self, name: str) -> Any:
        """Anything else (``decoded_moments``, ``store_moments``, ``state_bytes`` ...) is the inner optimizer's."""
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)

    def __repr__(self) -> str:
        return f"CompensatedOptimizer({self.mode}, {self.inner!r})"

    def _positions(self) -> Iterator[tuple[int, Tensor]]:
        """(position, parameter) in param-group order: the position seeds the stochastic rounding."""
        position = 0
        for group in self.param_groups:
            for p in group["params"]:
                yield position, p
                position += 1

    @torch.no_grad()
    def step(self, closure: Callable[[], Any] | None = None) -> Any:  # type: ignore[override]
        """One step: every parameter with a gradient is updated alone (others' gradients hidden meanwhile)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        todo = [(pos, p, p.grad) for pos, p in self._positions()
                if p.grad is not None or SUPPLIED_GRAD in self.state.get(p, ())]  # galore_backward.py
        if not any(p.dtype == torch.bfloat16 for _, p, _ in todo):
            self.inner.step()
            return loss
        for _, p, _ in todo:
            p.grad = None
        try:
            for pos, p, grad in todo:
                self._step_one(pos, p, grad)
        finally:
            for _, p, grad in todo:
                p.grad = grad
        return loss

    def _step_one(self, position: int, p: Tensor, grad: Tensor) -> None:
        """Step ``p`` alone: on an fp32 copy when it is bf16, then round back (stochastic or Kahan)."""
        if p.dtype != torch.bfloat16:
            p.grad = grad
            self.inner.step()
            p.grad = None
            return
        stored = p.detach()
        comp = self.state[p].get(COMPENSATION_KEY) if p in self.state else None
        if comp is not None and comp.shape != stored.shape:  # DLRT resized the factor: compensation starts over
            comp = None
        work = stored.float()
        if comp is not None:
            work.add_(comp.float())
        work.grad = None if grad is None else grad.float()  # None: a low-rank gradient waits in the state
        with _standing_in(self.inner, p, work):
            self.inner.step()
        self._write_back(position, p, work)

    def _write_back(self, position: int, p: Tensor, work: Tensor) -> None:
        """Store the fp32 result ``work`` in bf16 ``p``: stochastically rounded, or nearest + Kahan residual."""
        state = self.state[p]
        count = int(state.get(ROUNDS_KEY, 0))
        if self.mode == "stochastic":
            p.data.copy_(stochastic_round(work, round_generator(self.seed, position, count, work.device)))
        else:
            p.data.copy_(work)
            state[COMPENSATION_KEY] = (work - p.data.float()).to(torch.bfloat16)
        state[ROUNDS_KEY] = count + 1

    def zero_grad(self, set_to_none: bool = True) -> None:
        self.inner.zero_grad(set_to_none=set_to_none)

    def state_dict(self) -> dict[str, Any]:
        return self.inner.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """The inner loader, then every saved state tensor back in its saved dtype (torch casts float state to the
        parameter's dtype, bf16, which would round fp32 moments: resume would not be bit-exact)."""
        self.inner.load_state_dict(state_dict)
        self.param_groups = self.inner.param_groups
        self.state = self.inner.state  # type: ignore[assignment]
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        for pid, (_, p) in zip(saved_ids, self._positions()):
            current, saved = self.state.get(p), state_dict["state"].get(pid)
            if not current or not saved:
                continue
            for key, value in saved.items():  # owned copies: torch's loader aliases the source dict's tensors
                if isinstance(value, Tensor):
                    device = value.device if key == "step" else p.device  # torch keeps its step counter on the CPU
                    current[key] = value.detach().to(device=device, copy=True)


def wrap_for_dtype(optimizer: torch.optim.Optimizer, dtype: str, update: str, seed: int) -> torch.optim.Optimizer:
    """The run's optimizer, compensated for bf16 weights unless ``--bf16-update plain`` (or not bf16)."""
    if dtype != "bf16" or update == "plain":
        return optimizer
    return CompensatedOptimizer(optimizer, update, seed)
