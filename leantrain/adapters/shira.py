"""SHiRA: Sparse High Rank Adapters -- train a fixed sparse set of K entries of each target weight.

Papers: Bhardwaj et al., *Sparse High Rank Adapters*, NeurIPS 2024, https://arxiv.org/abs/2406.13175, and
*Rapid Switching and Multi-Adapter Fusion via Sparse High Rank Adapters*, https://arxiv.org/abs/2407.16712.
File format and sizing follow PEFT's ``tuners/shira`` (``shira_weight`` (K,), ``shira_indices`` int32 (2, K),
``K = r * (out + in)``), see /work/shared/methods/shira.md.

Design choices (why):
* The trainable state is the value vector only (K floats), so gradients and optimizer state scale with K.
* Forward is ``base(x) + x @ S^T`` with S a CSR matrix built around the value vector each call (no dense ΔW, no
  weight copy; works on a quantized base because the base layer runs unchanged). A custom autograd function
  computes ``dL/dx = dY @ S`` with a cached transposed CSR layout and ``dL/dvalues`` with a sampled dense-dense
  matmul (``torch.sparse.sampled_addmm``), so the dense ``dY^T X`` gradient is never formed either.
* Fused mode (``merge``) overwrites only the K entries in place and keeps their original values, so ``unmerge``
  restores the base weights bit-exactly (``w + d - d`` is not always ``w`` in floating point). Merging several
  adapters and unmerging (newest first) restores exactly even where their masks overlap.
* Rapid switching keeps the K originals after ``unmerge`` (K values per adapter), so the next ``merge`` of that
  adapter scatters without gathering first: 2 random passes over the touched entries per switch instead of 3. The
  cache is trusted only while the weight's version counter (and storage) are what this layer's own last write left;
  any other in-place write through the Parameter (an optimizer step, ``copy_``, ``load_state_dict``) is detected:
  before a merge it drops the cache, while adapters are merged it makes ``merge``/``unmerge`` raise, since
  restoring would overwrite that write. Writes through ``weight.data`` bypass the counter and are not detected.
* Random masks are seeded per layer from ``(seed, layer name)`` so layers of equal shape get different patterns
  (PEFT reuses one seed, i.e. the same pattern, for every layer); indices are saved, so reloads are exact anyway.
"""
from __future__ import annotations

import warnings
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import nn

from .base import AdapterLayer, add_to_base_weight, base_weight
from .config_fields import get_bool, get_float, get_int
from .registry import register_adapter
from .shira_masks import MASK_KINDS, as_flat_indices, flat_to_indices, make_mask, shira_count

# torch warns once that CSR support is "beta"; the two CSR ops used here are covered by our tests.
warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta", category=UserWarning)


@dataclass
class ShiraConfig:
    """One SHiRA adapter. K per layer = ``int(fraction*out*in)`` if ``fraction`` else ``r*(out+in)``.

    ``mask``: "random" | "magnitude" | "gradient" | "snip" | a callable ``fn(weight, k, *, seed, grad) -> Tensor``
    returning a 0/1 mask of the weight's shape, K flat row-major indices or (2, K) row/col indices. "gradient"
    and "snip" (and a callable, if given one) use |dL/dW| accumulated over ``calib`` batches passed to ``inject``.
    """

    peft_type: ClassVar[str] = "SHIRA"

    r: int = 32
    fraction: float | None = None
    mask: str | Callable[..., torch.Tensor] = "random"
    target_modules: str | list[str] = "all-linear"
    exclude_modules: str | list[str] | None = None  # None = skip the task head for all-linear / regex targets
    seed: int = 0
    init_weights: bool = True  # False: random values (tests only, PEFT's init_weights=False)

    def __post_init__(self) -> None:
        if isinstance(self.target_modules, (set, tuple)):
            self.target_modules = sorted(self.target_modules)
        if not isinstance(self.r, int) or isinstance(self.r, bool) or self.r <= 0:
            raise ValueError(f"ShiraConfig.r={self.r!r} must be a positive integer")
        if self.fraction is not None and not 0 < self.fraction <= 1:
            raise ValueError(f"ShiraConfig.fraction={self.fraction!r} must be in (0, 1]")
        if not callable(self.mask) and self.mask not in MASK_KINDS:
            raise ValueError(f"ShiraConfig.mask={self.mask!r}; choose one of {', '.join(MASK_KINDS)} or a callable")
        self._scores: dict[str, torch.Tensor] = {}
        self._from_file = False

    def count(self, out_features: int, in_features: int, where: str = "layer") -> int:
        try:
            return shira_count(out_features, in_features, None if self.fraction else self.r, self.fraction)
        except ValueError as exc:
            raise ValueError(f"{where} ({out_features}x{in_features}): {exc}") from None

    def layer_seed(self, layer_name: str) -> int:
        return (int(self.seed) * 1_000_003 + zlib.crc32(layer_name.encode())) & 0x7FFF_FFFF

    # ---- inject hook: gradient scores for "gradient" / "snip" masks ------------------------------------------
    def prepare(self, model: nn.Module, target_names: list[str], calib: Any) -> None:
        needs = self.mask in ("gradient", "snip") or (callable(self.mask) and calib is not None)
        if self._from_file or not needs:
            return
        if calib is None:
            raise ValueError(f"SHiRA mask {self.mask!r} needs calibration batches: inject(..., calib=fn) where "
                             "fn(model) yields scalar losses")
        self._scores = accumulate_gradients(model, target_names, calib)

    # ---- PEFT adapter_config.json ----------------------------------------------------------------------------
    def to_peft_dict(self, targets: list[str]) -> dict[str, Any]:
        body: dict[str, Any] = {
            "r": self.r, "mask_type": self.mask if isinstance(self.mask, str) else "custom",
            "random_seed": self.seed, "target_modules": targets, "fan_in_fan_out": False,
            "init_weights": self.init_weights, "modules_to_save": None,
        }
        if self.fraction is not None:  # not a PEFT field: such files load in leantrain only (K != r(out+in))
            body["fraction"] = self.fraction
        return body

    @classmethod
    def from_peft_dict(cls, d: dict[str, Any]) -> ShiraConfig:
        mask = d.get("mask_type", "random")
        fraction = d.get("fraction")
        if fraction is not None:
            fraction = get_float(d, "fraction", 0.0, "SHiRA")
        config = cls(r=get_int(d, "r", 32, "SHiRA", minimum=1), fraction=fraction,
                     mask=mask if mask in MASK_KINDS else "random",
                     target_modules=d.get("target_modules") or "all-linear", seed=get_int(d, "random_seed", 0, "SHiRA"),
                     init_weights=get_bool(d, "init_weights", True, "SHiRA"))
        config._from_file = True  # indices come from the file: no mask computation, no calibration
        return config


def accumulate_gradients(model: nn.Module, target_names: list[str], calib: Any) -> dict[str, torch.Tensor]:
    """Sum of |dL/dW| over the losses ``calib(model)`` yields, for the base weight of each target module.

    Uses ``torch.autograd.grad`` so no ``.grad`` is touched, and restores every ``requires_grad`` flag after.
    Peak memory: one fp32 score tensor per targeted weight plus one backward pass.
    """
    weights: dict[str, torch.Tensor] = {}
    for name in target_names:
        module = model.get_submodule(name)
        base = module.base_layer if isinstance(module, AdapterLayer) else module
        w = getattr(base, "weight", None)
        if not isinstance(w, nn.Parameter) or not w.is_floating_point():
            raise ValueError(f"SHiRA gradient/SNIP masks need a floating-point weight Parameter on {name!r} "
                             f"({type(base).__name__}); compute the mask before quantizing the base")
        weights[name] = w
    flags = {id(p): p.requires_grad for p in model.parameters()}
    scores = {n: torch.zeros_like(w, dtype=torch.float32) for n, w in weights.items()}
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        for w in weights.values():
            w.requires_grad_(True)
        seen = 0
        for loss in _iterate(calib(model)):
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1 or not loss.requires_grad:
                raise ValueError("SHiRA calibration must yield scalar loss tensors that depend on the model")
            grads = torch.autograd.grad(loss, list(weights.values()), allow_unused=True)
            for (name, _), g in zip(weights.items(), grads):
                if g is not None:
                    scores[name] += g.detach().abs().float()
            seen += 1
        if seen == 0:
            raise ValueError("SHiRA calibration yielded no losses")
    finally:
        for p in model.parameters():
            p.requires_grad_(flags[id(p)])
    return scores


def _iterate(losses: Iterable[torch.Tensor]) -> Iterable[torch.Tensor]:
    if isinstance(losses, torch.Tensor):
        return [losses]
    return losses


# ---- sparse delta matmul ---------------------------------------------------------------------------------------
class _SparseDelta(torch.autograd.Function):
    """y = x @ S^T for S = csr(values * scale); grads for x (transposed CSR) and values (SDDMM)."""

    @staticmethod
    def forward(ctx: Any, x2d: torch.Tensor, values: torch.Tensor, p: ShiraParams, scale: float) -> torch.Tensor:
        s = torch.sparse_csr_tensor(p.crow, p.cols(), values * scale, p.shape, check_invariants=False)
        ctx.save_for_backward(x2d, values)
        ctx.p, ctx.scale = p, scale
        return (s @ x2d.T).T

    @staticmethod
    def backward(ctx: Any, gy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x2d, values = ctx.saved_tensors
        p, scale = ctx.p, ctx.scale
        gx = gv = None
        if ctx.needs_input_grad[0]:
            out_f, in_f = p.shape
            t_crow, t_perm = p.transposed()
            st = torch.sparse_csr_tensor(t_crow, p.rows()[t_perm], (values * scale)[t_perm], (in_f, out_f),
                                         check_invariants=False)
            gx = (st @ gy.T).T
        if ctx.needs_input_grad[1]:
            pattern = torch.sparse_csr_tensor(p.crow, p.cols(), torch.zeros_like(values), p.shape,
                                              check_invariants=False)
            gv = torch.sparse.sampled_addmm(pattern, gy.T, x2d, beta=0.0).values() * scale
        return gx, gv, None, None


class ShiraParams(nn.Module):
    """One SHiRA adapter: trainable ``shira_weight`` (K,) + sorted flat positions and cached CSR layouts."""

    def __init__(self, shape: tuple[int, int], flat: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.shape = shape
        self.scaling = 1.0  # alpha of W + alpha * S; 1 while training (set_scale for inference / fusion)
        self.shira_weight = nn.Parameter(values)
        # merged_orig: the K base values under a merged adapter; orig_cache: the same after unmerge, for the next
        # merge (valid while ShiraLinear's write stamp matches the weight, see ShiraLinear._stamp)
        for name in ("flat", "crow", "merged_orig", "orig_cache"):
            self.register_buffer(name, None, persistent=False)
        self.set_positions(flat)

    def set_positions(self, flat: torch.Tensor) -> None:
        """Install sorted flat indices (int32 when they fit: 4 bytes per entry) and the row pointers of S."""
        self.orig_cache = None
        out_f, in_f = self.shape
        dtype = torch.int32 if out_f * in_f < 2**31 else torch.int64
        flat = flat.to(device=self.shira_weight.device, dtype=dtype)
        self.flat = flat
        counts = torch.bincount((flat // in_f).long(), minlength=out_f)
        self.crow = torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(dtype)

    def transposed(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(row pointers, value permutation) of S^T in CSR order. Rebuilt per backward instead of cached: one sort
        of K indices (~10% of the backward's sparse time) saves 8 bytes per entry of persistent memory."""
        in_f = self.shape[1]
        cols = self.flat % in_f
        perm = torch.sort(cols, stable=True).indices  # flat is row-major: stable -> (col, row) order
        counts = torch.bincount(cols.long(), minlength=in_f)
        return torch.cat([counts.new_zeros(1), counts.cumsum(0)]).to(self.flat.dtype), perm

    def long_flat(self) -> torch.Tensor:
        """int64 positions for index_select / index_copy_ / index_add_ (they require long indices)."""
        return self.flat.long()

    def rows(self) -> torch.Tensor:
        return self.flat // self.shape[1]

    def cols(self) -> torch.Tensor:
        return self.flat % self.shape[1]


class ShiraLinear(AdapterLayer):
    """SHiRA on nn.Linear (or a quantized Linear exposing ``dequantize()``; fused mode then adds a dense ΔW)."""

    def create_adapter(self, name: str, config: ShiraConfig) -> nn.Module:
        where = getattr(self, "layer_name", type(self.base_layer).__name__)
        out_f, in_f = self.out_features, self.in_features
        k = config.count(out_f, in_f, where=f"SHiRA layer {where!r}")
        weight = base_weight(self.base_layer)
        dtype = weight.dtype if weight.dtype in (torch.float32, torch.float64) else torch.float32
        if config._from_file:  # placeholder positions, overwritten by load_peft_state
            flat = torch.arange(k, device=weight.device)
        else:
            grad = config._scores.pop(where, None)
            flat = make_mask(config.mask, weight.detach(), k, config.layer_seed(where), grad, where=repr(where))
        values = torch.zeros(k, dtype=dtype, device=weight.device)
        if not config.init_weights:
            values.normal_()
        return ShiraParams((out_f, in_f), flat, values)

    def delta_weight(self, name: str) -> torch.Tensor:
        p = self.adapters[name]
        dtype = base_weight(self.base_layer).dtype
        delta = torch.zeros(p.shape[0] * p.shape[1], dtype=p.shira_weight.dtype, device=p.flat.device)
        delta.index_add_(0, p.long_flat(), p.shira_weight * p.scaling)
        return delta.view(p.shape).to(dtype)

    def adapter_output(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        p = self.adapters[name]
        x2d = x.reshape(-1, x.shape[-1]).to(p.shira_weight.dtype)
        y = _SparseDelta.apply(x2d, p.shira_weight, p, float(p.scaling))
        return y.reshape(*x.shape[:-1], p.shape[0])

    # ---- fused mode: scatter K entries in place, restore them bit-exactly --------------------------------------
    def _plain_weight(self) -> torch.Tensor | None:
        """The base weight Parameter itself (not ``.data``: its version counter must see every write), or None
        for a quantized / strided base."""
        layer = self.base_layer
        if hasattr(layer, "dequantize") or hasattr(layer, "add_to_weight"):
            return None
        w = layer.weight
        return w if w.is_contiguous() else None

    @staticmethod
    def _stamp(w: torch.Tensor) -> tuple[int, int]:
        return w.data_ptr(), w._version

    def _check_no_foreign_write(self, w: torch.Tensor, action: str) -> bool:
        """False if the weight was written by someone else since this layer's last merge/unmerge (then the cached
        originals are stale); raises if that happened while adapters were merged (restoring would undo it)."""
        stamp = getattr(self, "_shira_stamp", None)
        if stamp is None or stamp == self._stamp(w):
            return stamp is not None
        if self.merged_adapters:
            where = getattr(self, "layer_name", type(self.base_layer).__name__)
            raise RuntimeError(f"SHiRA layer {where!r}: cannot {action}: its base weight was written by something "
                               f"else while adapter(s) {self.merged_adapters} were merged (weight version "
                               f"{w._version}, SHiRA's last write left {stamp[1]}); restoring the saved entries would "
                               "overwrite that write -- reload the base weights")
        for p in self.adapters.values():
            p.orig_cache = None
        return False

    @torch.no_grad()
    def merge_one(self, name: str) -> None:
        p = self.adapters[name]
        w = self._plain_weight()
        if w is None:  # quantized / strided base: dense delta through the base helper (not bit-exact)
            return add_to_base_weight(self.base_layer, self.delta_weight(name))
        trusted = self._check_no_foreign_write(w, f"merge adapter {name!r}")
        flat_w, idx = w.view(-1), p.long_flat()
        cached = p.orig_cache if trusted and not self.merged_adapters else None  # gathered with nothing merged
        orig = cached if cached is not None else flat_w.index_select(0, idx)  # kept for the bit-exact restore
        acc = torch.promote_types(w.dtype, torch.float32)  # fp32 math on half weights (spec pitfall §6)
        delta = p.shira_weight.detach().to(acc)
        if p.scaling != 1.0:
            delta = delta * p.scaling
        flat_w.index_copy_(0, idx, (orig.to(acc) + delta).to(w.dtype))
        p.merged_orig, p.orig_cache = orig, None
        self._shira_stamp = self._stamp(w)

    @torch.no_grad()
    def unmerge_one(self, name: str) -> None:
        p = self.adapters[name]
        if p.merged_orig is None:
            return add_to_base_weight(self.base_layer, -self.delta_weight(name))
        w = self._plain_weight()
        self._check_no_foreign_write(w, f"unmerge adapter {name!r}")
        w.view(-1).index_copy_(0, p.long_flat(), p.merged_orig)
        # originals gathered under other merged adapters hold their values at overlaps: not reusable alone
        p.orig_cache = p.merged_orig if self.merged_adapters == [name] else None
        p.merged_orig = None
        self._shira_stamp = self._stamp(w)

    # ---- PEFT tensors --------------------------------------------------------------------------------------------
    def peft_state(self, name: str) -> dict[str, torch.Tensor]:
        p = self.adapters[name]
        return {"shira_weight": p.shira_weight, "shira_indices": flat_to_indices(p.long_flat(), p.shape[1])}

    def load_peft_state(self, name: str, tensors: dict[str, torch.Tensor], where: str = "") -> None:
        p = self.adapters[name]
        k = p.shira_weight.numel()
        missing = sorted({"shira_weight", "shira_indices"} - set(tensors))
        if missing:
            raise KeyError(f"{where}: adapter file lacks {', '.join(repr(where + '.' + m) for m in missing)}")
        unexpected = sorted(set(tensors) - {"shira_weight", "shira_indices"})
        if unexpected:
            raise KeyError(f"{where}: unexpected key(s) {unexpected} for a {type(self).__name__}")
        values, indices = tensors["shira_weight"], tensors["shira_indices"]
        for key, got, want in (("shira_weight", values, (k,)), ("shira_indices", indices, (2, k))):
            if tuple(got.shape) != want:
                raise ValueError(f"shape mismatch for {where}.{key}: file has {tuple(got.shape)}, "
                                 f"model expects {want}")
        if indices.is_floating_point():  # PEFT on Windows stores indices as float32
            indices = indices.round().to(torch.int64)
        rows, cols = indices.to(torch.int64)
        if k and (rows.min() < 0 or rows.max() >= p.shape[0] or cols.min() < 0 or cols.max() >= p.shape[1]):
            raise ValueError(f"{where}.shira_indices fall outside the {p.shape[0]}x{p.shape[1]} weight")
        flat_file = rows * p.shape[1] + cols
        order = torch.argsort(flat_file)
        flat = as_flat_indices(flat_file[order], p.shape, k, where=repr(where))  # uniqueness check
        if p.merged_orig is not None:
            raise ValueError(f"{where}: unmerge adapter {name!r} before loading new tensors into it")
        with torch.no_grad():
            p.shira_weight.copy_(values[order].to(dtype=p.shira_weight.dtype, device=p.shira_weight.device))
        p.set_positions(flat)


# ---- model-level helpers ------------------------------------------------------------------------------------------
def set_scale(model: nn.Module, name: str, scale: float) -> None:
    """Set alpha in ``W + alpha * S`` for adapter ``name`` on every layer (unmerged adapters only)."""
    from .inject import adapter_layers

    for _, layer in adapter_layers(model):
        if isinstance(layer, ShiraLinear) and name in layer.adapters:
            if name in layer.merged_adapters:
                raise ValueError(f"adapter {name!r} is merged; unmerge before changing its scale")
            layer.adapters[name].scaling = float(scale)


def switch(model: nn.Module, names: str | list[str]) -> None:
    """Rapid switching in fused mode: restore the merged entries, then scatter ``names`` into the base weights."""
    from .multi import merge, unmerge

    unmerge(model)
    merge(model, names)


register_adapter(ShiraConfig, ShiraLinear)
