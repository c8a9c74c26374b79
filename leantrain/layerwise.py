"""``--layerwise``: the optimizer step inside backward, so only one gradient is alive at a time.

Each trainable parameter gets a ``register_post_accumulate_grad_hook``. Autograd runs it once per backward, right
after the parameter's gradient is complete (all uses summed, tied weights included); the hook clips that gradient,
checks it, calls ``optimizer.step()`` and frees it. Every other parameter has no gradient at that moment (stepped
ones were freed, later ones do not exist yet), so the shared optimizer steps exactly this parameter: its
``state_dict`` and the checkpoint format are the ordinary ones, and any optimizer works unchanged (leantrain's
BlockOptimizer family with its codecs and GaLore projector refreshes, torch's AdamW, the bf16 compensation wrapper).

Under torchrun the step must see the *synchronised* gradient, not the local one autograd just produced:

* ``--strategy fsdp`` (FSDP2): the hooks sit on the sharded parameters (what the optimizer holds). Autograd never
  fires them (it only touches the unsharded parameters); FSDP2's ``foreach_reduce`` calls them itself right after
  it assigns the reduce-scattered, averaged shard to ``sharded_param.grad`` (torch's optimizer-in-backward path,
  on the post-reduce stream on CUDA, so the step is ordered after the reduce-scatter). Within a unit FSDP2
  assigns and hooks parameter by parameter, so here too only the hooked parameter has a gradient.
* ``--strategy ddp``: the parameter hooks are not registered (they would see the local gradient). A DDP
  communication hook replaces the bucket all-reduce: it averages the bucket (``mul_(1/world)`` then a SUM
  all-reduce, the values DDP's own reducer produces), waits for it on the autograd thread, then steps the
  bucket's parameters one by one with the averaged bucket views as gradients (other parameters' gradients
  hidden meanwhile) and returns a completed future. The step is therefore per *bucket* (DDP's first bucket
  1 MiB, then 25 MiB), synchronous (no overlap of this all-reduce with backward compute), and DDP keeps its
  bucket buffers: the run wraps DDP with ``gradient_as_bucket_view=True`` so ``p.grad`` are views of them and
  no second copy exists, but one full gradient per rank stays allocated for the whole run. ``peak_grad_bytes``
  reports those buffers (under FSDP2: this rank's shard bytes alive at a hook; one process: all live gradients).
  The progress callback ``on_update`` runs on the autograd thread in every mode (the DDP hook does not defer).

Semantics that differ from the ordinary step, by necessity (the global gradient never exists):

* ``--grad-clip C`` clips *each parameter's* gradient norm to C (torch's ``clip_grad_norm_`` formula per
  parameter; under FSDP2 the norm of the whole parameter, from one all-reduce of the shards' squared sums).
  With ``--grad-clip none`` the update equals the ordinary step.
* ``--nan-policy``: a non-finite loss is caught before backward (stop: raise; skip: no update, as ordinarily;
  under torchrun the *global* mean loss decides, so every rank takes the same branch, and skip still runs backward
  -- DDP/FSDP2 need their collectives -- with every update dropped). A non-finite gradient of one parameter with a
  finite loss: stop raises naming it; skip drops that parameter's update only (parameters stepped earlier in this
  backward keep theirs). Under torchrun every rank decides on the same numbers: DDP's averaged bucket is identical
  on all ranks, and under FSDP2 the shards' non-finite counts are all-reduced (one small all-reduce per parameter,
  shared with the clipping norm). stop then drops every remaining update of that backward and raises after it on
  every rank (raising inside the collective hooks would leave the other ranks waiting).
* ``--grad-accum K`` (one process): micro-batches 1..K-1 do not step. Each hook moves the gradient into an
  accumulator and frees it; the hook of the last micro-batch adds its gradient and steps. Parameters a GaLore-family
  optimizer projects accumulate their *low-rank* gradient (r x n fp32 per matrix, ``optimizer.accumulate_projected``
  / projector.accumulate) -- the summed projection equals the projection of the summed gradient, except at a
  refresh step, whose basis comes from the first micro-batch's gradient (the only one there is before projecting).
  Every other parameter accumulates its full gradient in the gradient's dtype (the first micro-batch's tensor is
  reused as the buffer). ``--grad-clip`` then clips each parameter's *accumulated* gradient: for a projected one,
  the low-rank gradient the optimizer sees. Under torchrun accumulation is refused (one line).
* Shape-changing methods (DLRT's multi-pass integrator) are refused (config). ``finish`` raises if a backward
  stepped nothing (e.g. hooks detached from a gradient accumulator), instead of training on nothing.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from .dist_utils import grad_bytes_local, local_tensor
from .optim import projector

CLIP_EPS = 1e-6  # as torch.nn.utils.clip_grad_norm_


@dataclass
class LayerwiseStep:
    """The hooks of one run; ``step`` is the loop's current step (for error messages).

    ``strategy`` is "none" (one process), "ddp" or "fsdp"; ``world`` the number of processes."""

    optimizer: torch.optim.Optimizer
    model: nn.Module
    grad_clip: float | None = None
    nan_policy: str = "stop"
    step: int = 0
    skipped_updates: int = 0  # parameter updates dropped by --nan-policy skip
    handles: list[Any] = field(default_factory=list)
    peak_grad_bytes: int = 0  # most gradient bytes alive at a hook (the measured point of --layerwise)
    stepped: int = 0  # parameters stepped in the current backward
    on_update: Callable[[int, int], None] | None = None  # (stepped, total): progress inside a long backward
    strategy: str = "none"
    world: int = 1
    discard: bool = False  # drop every update of this backward (a non-finite global loss under --nan-policy skip)
    pending: FloatingPointError | None = None  # torchrun + stop: raised by ``finish`` after backward on every rank
    bucket_bytes: dict[int, int] = field(default_factory=dict)  # DDP: bytes of each gradient bucket buffer
    total: int = 0  # parameters the optimizer holds
    buckets_reduced: int = 0  # DDP: buckets the communication hook reduced in the current backward
    skipped_before: int = 0  # skipped_updates when the current backward started
    micro: int = 0  # --grad-accum: the current micro-batch (0-based) of ``micros``
    micros: int = 1
    held: dict[int, tuple[Tensor, Tensor | None]] = field(default_factory=dict)  # id -> (param, full-gradient sum)
    dropped: set[int] = field(default_factory=set)  # parameters whose update this step was skipped (non-finite)
    peak_held_bytes: int = 0  # most accumulator bytes held between two micro-batches

    def start_step(self, step: int, discard: bool = False) -> None:
        """Called by the loop before each step's (first) backward."""
        self.step, self.stepped, self.discard, self.pending, self.buckets_reduced = step, 0, discard, None, 0
        self.skipped_before = self.skipped_updates
        self.micro, self.micros = 0, 1
        self._forget_accumulated()
        self.dropped.clear()

    def start_micro(self, micro: int, micros: int, discard: bool = False) -> None:
        """--grad-accum: called before the backward of micro-batch ``micro`` of ``micros``; ``discard`` drops the
        whole step (a non-finite loss under --nan-policy skip), including what earlier micro-batches summed."""
        self.micro, self.micros = micro, micros
        self.peak_held_bytes = max(self.peak_held_bytes, self.held_bytes())
        if discard:
            self.discard = True
            self._forget_accumulated()

    def finish(self) -> None:
        """Called by the loop after backward: under torchrun, --nan-policy stop raises here, on every rank. A
        backward in which no hook stepped or skipped anything (under DDP: no bucket reached the communication
        hook) fails loudly instead of silently training on nothing -- e.g. if a torch version stopped calling the
        sharded parameters' hooks from FSDP2's reduce-scatter."""
        if self.pending is not None:
            raise self.pending
        self._flush_held()
        if self.strategy == "ddp" and not self.buckets_reduced:
            raise RuntimeError(f"step {self.step + 1}: --layerwise under DDP: no gradient bucket was reduced in "
                               "this backward (DDP's gradient hooks no longer fire), so nothing was updated")
        if self.total and not (self.discard or self.stepped or self.skipped_updates > self.skipped_before):
            raise RuntimeError(f"step {self.step + 1}: --layerwise: no step hook fired in this backward "
                               f"(strategy {self.strategy}), so nothing was updated")

    def register(self, ddp: nn.Module | None = None, grad_accum: int = 1) -> LayerwiseStep:
        """Hook every parameter the optimizer holds (one process, FSDP2), or DDP's bucket reduction; returns self."""
        if self.strategy != "none" and grad_accum > 1:
            raise ValueError(f"--layerwise --grad-accum {grad_accum}: accumulation inside backward runs in one "
                             f"process only (here --strategy {self.strategy}); use --grad-accum 1 or drop --layerwise")
        params = optimizer_parameters(self.optimizer)
        self.total = len(params)
        if self.strategy == "ddp":
            if ddp is None or not hasattr(ddp, "register_comm_hook"):
                raise ValueError("--layerwise --strategy ddp needs the DistributedDataParallel wrapper")
            ddp.register_comm_hook(getattr(ddp, "process_group", None), self._ddp_bucket)
            return self
        for p in params:
            self.handles.append(p.register_post_accumulate_grad_hook(self._hook))
        return self

    def remove(self) -> None:
        """Detach the hooks (the model trains with ordinary steps afterwards; a DDP comm hook stays)."""
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    @torch.no_grad()
    def _hook(self, p: Tensor) -> None:
        """Clip, check, step and free the gradient of ``p`` (one process, or FSDP2's reduce-scattered shard)."""
        grad = p.grad
        if grad is None:
            return
        if self.strategy == "fsdp":
            self.peak_grad_bytes = max(self.peak_grad_bytes, grad_bytes_local(self.model.parameters()))
            finite, norm = self._shard_verdict(grad)
        else:
            self.peak_grad_bytes = max(self.peak_grad_bytes, live_grad_bytes(self.model) + self.held_bytes())
            finite, norm = bool(torch.isfinite(grad).all()), None
        if self.micros > 1:
            self._accumulate(p, finite)
            return
        self._apply(p, finite, norm)

    @torch.no_grad()
    def step_supplied(self, p: Tensor, low: Tensor) -> None:
        """--galore-in-backward: ``p``'s low-rank gradient ``low`` is complete (galore_backward.py); step ``p``."""
        self.peak_grad_bytes = max(self.peak_grad_bytes, live_grad_bytes(self.model) + low.numel() * low.element_size())
        self._apply(p, bool(torch.isfinite(low).all()), None)

    def _accumulate(self, p: Tensor, finite: bool) -> None:
        """--grad-accum: add ``p``'s micro-batch gradient to its accumulator (low-rank when the optimizer projects
        ``p``) and free it; at the last micro-batch step ``p`` with the sum."""
        grad, p.grad = p.grad, None
        if self.discard or self.pending is not None or id(p) in self.dropped:
            return
        if not finite:
            self.dropped.add(id(p))
            self._forget(p)
            p.grad = grad
            self._non_finite(p)
            return
        last = self.micro == self.micros - 1
        low = getattr(self.optimizer, "accumulate_projected", lambda *_: None)(p, grad)
        if low is None:
            _, total = self.held.pop(id(p), (p, None))
            grad = grad if total is None else total.add_(grad)
        if not last:
            self.held[id(p)] = (p, None if low is not None else grad)
            return
        self.held.pop(id(p), None)
        p.grad = grad  # marks ``p`` for the step; a projected one's step reads the low-rank sum instead
        self._apply(p, True, None, clip=low)

    def _flush_held(self) -> None:
        """Step what earlier micro-batches accumulated for parameters the last micro-batch gave no gradient."""
        for p, total in list(self.held.values()):
            p.grad = total if total is not None else torch.zeros_like(p)
            self._apply(p, True, None, clip=None if total is not None else self._projected_sum(p))
        self.held.clear()

    def _projected_sum(self, p: Tensor) -> Tensor | None:
        return self.optimizer.state.get(p, {}).get(projector.ACCUM_KEY)

    def _forget(self, p: Tensor) -> None:
        self.held.pop(id(p), None)
        projector.drop_accumulated(self.optimizer.state.get(p, {}))

    def _forget_accumulated(self) -> None:
        for p, _ in list(self.held.values()):
            self._forget(p)

    def held_bytes(self) -> int:
        """Bytes of the accumulators between micro-batches (full sums here, low-rank sums in the optimizer)."""
        sums = [t if t is not None else self._projected_sum(p) for p, t in self.held.values()]
        return sum(t.numel() * t.element_size() for t in sums if t is not None)

    def _apply(self, p: Tensor, finite: bool, norm: Tensor | None, clip: Tensor | None = None) -> None:
        """Step ``p`` alone with its (synchronised) gradient, or drop the update; frees the gradient. ``clip``: the
        tensor --grad-clip scales instead of ``p.grad`` (the low-rank sum of a projected parameter)."""
        if self.discard or self.pending is not None:
            p.grad = None
            return
        if not finite:
            self._non_finite(p)
            return
        if self.grad_clip:
            if norm is None:
                clip_parameter_grad_(p.grad if clip is None else clip, self.grad_clip)
            else:
                local_tensor(p.grad).mul_(clip_coefficient(norm, self.grad_clip))
        self.optimizer.step()
        p.grad = None
        self.stepped += 1
        if self.on_update is not None:
            self.on_update(self.stepped, self.total)

    def _shard_verdict(self, grad: Tensor) -> tuple[bool, Tensor]:
        """FSDP2: (finite, norm) of the whole gradient from this rank's shard, agreed by every rank (an all-reduce
        of [non-finite count, sum of squares]): a NaN in one rank's shard stops or skips every rank alike."""
        import torch.distributed as tdist

        local = local_tensor(grad)
        stats = torch.stack([(~torch.isfinite(local)).sum().float(), local.float().square().sum()])
        tdist.all_reduce(stats)
        return bool(stats[0] == 0), stats[1].sqrt()

    def _ddp_bucket(self, group, bucket):
        """DDP communication hook: average the bucket, then step its parameters with the averaged views.

        ``group`` is DDP's process group, ``bucket`` a ``dist.GradBucket``; returns a completed future."""
        import torch.distributed as tdist

        buffer = bucket.buffer()
        buffer.mul_(1.0 / self.world)  # what DDP's reducer does without a hook, while copying into the bucket
        tdist.all_reduce(buffer, group=group)
        self.buckets_reduced += 1
        self.bucket_bytes[bucket.index()] = buffer.numel() * buffer.element_size()
        self.peak_grad_bytes = max(self.peak_grad_bytes, sum(self.bucket_bytes.values()))
        self._step_bucket(list(bucket.parameters()), list(bucket.gradients()), bool(torch.isfinite(buffer).all()))
        done: torch.futures.Future = torch.futures.Future()
        done.set_result(buffer)
        return done

    @torch.no_grad()
    def _step_bucket(self, params: list[Tensor], grads: list[Tensor], all_finite: bool) -> None:
        """Step each parameter of a reduced bucket alone: every other gradient is hidden during the step."""
        mine = {id(p) for p in params}
        hidden = [(p, p.grad) for p in self.model.parameters() if p.grad is not None and id(p) not in mine]
        for p in [*params, *(q for q, _ in hidden)]:
            p.grad = None
        try:
            for p, g in zip(params, grads):
                p.grad = g
                self._apply(p, all_finite or bool(torch.isfinite(g).all()), None)
                p.grad = None  # DDP's finalize points it back at the bucket view
        finally:
            for p, g in hidden:
                p.grad = g

    def _non_finite(self, p: Tensor) -> None:
        """stop: raise naming the parameter (after backward under torchrun); skip: drop this parameter's update."""
        p.grad = None
        if self.nan_policy == "stop":
            name = next((n for n, q in self.model.named_parameters() if q is p), "?")
            error = FloatingPointError(f"step {self.step + 1}: non-finite gradient in {name} (--layerwise); rerun "
                                       "with --nan-policy skip to skip such updates")
            if self.strategy == "none":
                raise error
            self.pending = error  # every rank saw the same numbers: all raise in finish(), none waits
            return
        self.skipped_updates += 1


def clip_parameter_grad_(grad: Tensor, max_norm: float) -> Tensor:
    """Scale ``grad`` in place so its norm is at most ``max_norm`` (torch's clip coefficient, for one tensor)."""
    grad.mul_(clip_coefficient(torch.linalg.vector_norm(grad.float()), max_norm).to(grad.dtype))
    return grad


def clip_coefficient(norm: Tensor, max_norm: float) -> Tensor:
    """torch's ``clip_grad_norm_`` factor for a gradient of norm ``norm``."""
    return torch.clamp(max_norm / (norm + CLIP_EPS), max=1.0)


def optimizer_parameters(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    """Every parameter of every group, once."""
    seen: dict[int, Tensor] = {}
    for group in optimizer.param_groups:
        for p in group["params"]:
            seen.setdefault(id(p), p)
    return list(seen.values())


def live_grad_bytes(model: nn.Module) -> int:
    """Bytes of the gradients that exist right now."""
    return sum(p.grad.numel() * p.grad.element_size() for p in model.parameters() if p.grad is not None)
