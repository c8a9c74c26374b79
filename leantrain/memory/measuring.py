"""Measure the peak memory of a real training step, in the same unit the estimator predicts: tensor bytes.

* CUDA: the caching allocator's own counters (``torch.cuda.max_memory_allocated`` after
  ``reset_peak_memory_stats``): exact bytes handed to tensors, excluding cache slack and the CUDA context.
* CPU: there is no allocator peak counter, and process RSS (``ru_maxrss``, VmHWM) measures something else: glibc
  keeps freed arenas, Python objects, the tokenizer and shared libraries all count, and the high-water mark cannot
  be reset within one process. We therefore use the torch profiler with ``profile_memory=True``, which records
  every CPU-allocator allocation and free (signed ``nbytes`` with a timestamp). Replaying those events in time
  order gives the exact peak of *tensor* bytes allocated during the step relative to its start; adding the bytes
  of the tensors alive at the start (parameters, buffers, gradients and optimizer states -- unique storages)
  gives the absolute peak. This is what ``MemoryReport.total`` models, so the two are directly comparable.
  (The per-event records come from ``prof.profiler.kineto_results``, torch's documented-by-use but private
  handle; ``_peak_from_profile`` falls back to the public ``prof.events()`` list if it disappears.)

The first call(s) of a step allocate optimizer states lazily, so ``measure`` runs ``warmup`` steps first and
measures the next one: the steady state of training.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn


@dataclass
class MeasuredMemory:
    peak: int  # bytes: peak of live tensor memory during the measured step
    resident: int  # bytes alive when the step started (weights, buffers, optimizer states, leftover grads)
    device: str
    method: str  # how it was measured: "cuda-allocator" | "cpu-profiler"

    def as_dict(self) -> dict[str, Any]:
        return {"peak": self.peak, "resident": self.resident, "device": self.device, "method": self.method}


def _storages(tensors: Iterable[torch.Tensor]) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            st = t.untyped_storage()
            seen[st.data_ptr()] = max(seen.get(st.data_ptr(), 0), st.nbytes())
    return sum(seen.values())


def live_tensors(model: nn.Module | None, optimizer: Any = None) -> list[torch.Tensor]:
    """Tensors a training state keeps between steps: parameters, their grads, buffers, optimizer state.

    ``optimizer`` may be a list, and wrappers exposing ``.inner``/``.optimizer`` (DLRT's KLS integrator) are
    followed, so the wrapped optimizer's state counts too."""
    out: list[torch.Tensor] = []
    if model is not None:
        for p in model.parameters():
            out.append(p)
            if p.grad is not None:
                out.append(p.grad)
        out.extend(model.buffers())
    opts = list(optimizer) if isinstance(optimizer, (list, tuple)) else [optimizer]
    while opts:
        opt = opts.pop()
        if opt is None:
            continue
        opts.extend(getattr(opt, a) for a in ("inner", "optimizer") if hasattr(getattr(opt, a, None), "state"))
        stack: list[Any] = list(opt.state.values())
        while stack:
            v = stack.pop()
            if isinstance(v, torch.Tensor):
                out.append(v)
            elif isinstance(v, dict):
                stack.extend(v.values())
            elif isinstance(v, (list, tuple)):
                stack.extend(v)
    return out


def _peak_from_profile(prof: Any) -> int:
    """Max over time of the running sum of allocator events recorded by the profiler (bytes above the start)."""
    try:
        events = [(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
                  and e.device_type() == torch.autograd.DeviceType.CPU]
    except AttributeError:  # pragma: no cover - older/newer torch without the kineto handle
        events = [(e.time_range.start, e.cpu_memory_usage) for e in prof.events() if e.name == "[memory]"]
    running = peak = 0
    for _, nbytes in sorted(events, key=lambda x: x[0]):
        running += nbytes
        peak = max(peak, running)
    return peak


def measure(step: Callable[[], Any], model: nn.Module | None = None,
            optimizer: Any = None, warmup: int = 1,
            device: str | torch.device | None = None) -> MeasuredMemory:
    """Peak tensor memory of one call of ``step()`` after ``warmup`` calls.

    ``model``/``optimizer`` tell the CPU path which tensors are alive before the step (their bytes are added to
    the profiled peak); on CUDA the allocator already knows. ``step`` should do forward, backward,
    ``optimizer.step()`` and ``zero_grad`` -- a real training step.
    """
    if warmup < 0:
        raise ValueError(f"warmup={warmup} must be >= 0")
    if device is None:
        p = next(iter(model.parameters()), None) if model is not None else None
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        resident = torch.cuda.memory_allocated(device)
        step()
        torch.cuda.synchronize(device)
        return MeasuredMemory(torch.cuda.max_memory_allocated(device), resident, str(device), "cuda-allocator")
    if device.type != "cpu":
        raise ValueError(f"measure supports cpu and cuda devices, not {device}")
    from torch.profiler import ProfilerActivity, profile

    resident = _storages(live_tensors(model, optimizer))
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return MeasuredMemory(resident + _peak_from_profile(prof), resident, "cpu", "cpu-profiler")


class RandomBatchTask:
    """A classification task on one fixed random batch: a training step's memory depends on its shape only, so
    measuring needs neither the data set nor the tokenizer."""

    def __init__(self, model: nn.Module, batch_size: int, seq_len: int, num_labels: int, seed: int):
        self.model = self.forward_model = model
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(5, model.encoder.config.vocab_size, (batch_size, seq_len), generator=gen)
        labels = torch.randint(0, num_labels, (batch_size,), generator=gen)
        self.fixed = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}

    def batches_per_epoch(self) -> int:
        return 1

    def batch(self, index: int) -> dict[str, torch.Tensor]:
        return self.fixed

    def loss(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.nn.functional.cross_entropy(self.forward_model(batch["input_ids"], batch["attention_mask"]),
                                                 batch["labels"])


def build_training_step(cfg: Any, batch_size: int, seq_len: int, num_labels: int = 2, seed: int = 0):
    """(step, model, optimizer) for ``cfg``: the run ``leantrain train`` would assemble, on a random batch.

    The run comes from ``run.build_run`` (quantized base, method, head group, optimizer and its wrapper) and the
    step is one iteration of the training loop's closure (one micro-batch: forward, backward, clipping, finite
    check) and ``optimizer.step``, followed by ``zero_grad(set_to_none=True)`` so that gradients are not counted
    as resident between steps -- the training step the estimator models.
    """
    from ..models import build_classifier
    from ..run import build_run

    torch.manual_seed(seed)
    cfg = replace(cfg, grad_accum=1)
    task = RandomBatchTask(build_classifier(cfg.model, num_labels, seed=seed), batch_size, seq_len, num_labels,
                           seed)
    run = build_run(cfg, task=task)
    run.model.train()
    return run_step(run), run.model, run.optimizer


def run_step(run: Any) -> Callable[[], None]:
    """One iteration of the training loop for an assembled run: the closure (forward, backward; under
    ``--layerwise`` the hooks step inside it) and ``optimizer.step``, then ``zero_grad(set_to_none=True)``."""
    from ..loop import Closure

    closure, optimizer = Closure.for_run(run), run.optimizer

    def step() -> None:
        if run.layerwise is not None:
            closure()
        else:
            optimizer.step(closure)
        optimizer.zero_grad(set_to_none=True)

    return step


def assembled_step(cfg: Any) -> tuple[Callable[[], None], Any]:
    """One training iteration of the run ``leantrain train`` assembles for ``cfg`` (model in train mode), and the
    run."""
    from ..run import build_run

    run = build_run(cfg)
    run.model.train()
    return run_step(run), run


def measure_run(cfg: Any, warmup: int = 0, steps: int = 1) -> tuple[MeasuredMemory, Any]:
    """Peak tensor memory of the run ``leantrain train`` assembles for ``cfg`` (its own data; any task), and the
    run: the largest peak of steps ``warmup + 1`` ... ``warmup + steps``. The first step allocates the optimizer
    states and computes GaLore's first projector basis; under ``--layerwise`` it is not the peak, though: the hooks
    create each state as backward frees activations, so only from step 2 on are all states alive beside all
    activations -- measure ``steps=2`` for the run's peak."""
    if steps < 1:
        raise ValueError(f"steps={steps} must be >= 1")
    step, run = assembled_step(cfg)
    peaks = [measure(step, run.model, run.optimizer, warmup=warmup if i == 0 else 0) for i in range(steps)]
    return max(peaks, key=lambda m: m.peak), run


def dlrt_ranks(model: nn.Module) -> dict[str, int]:
    """Current rank of every DLRT layer (module name -> r), the input ``estimate(dlrt_ranks=...)`` needs: leantrain
    picks initial ranks from the pretrained singular values and adapts them, so they are not known in advance."""
    return {n: int(m.U.shape[1]) for n, m in model.named_modules()
            if isinstance(getattr(m, "U", None), torch.Tensor) and hasattr(m, "K") and hasattr(m, "L")}


def measure_config(cfg: Any, batch_size: int, seq_len: int, num_labels: int = 2, warmup: int = 1) -> MeasuredMemory:
    """Peak memory of a steady-state training step of a ``TrainConfig`` (built with leantrain's own pieces)."""
    step, model, optimizer = build_training_step(cfg, batch_size, seq_len, num_labels)
    return measure(step, model, optimizer, warmup=warmup)
