"""Adam/AdamW with block-wise 8-bit / 4-bit / bf16 / fp32 states, plus the shared optimizer core.

Paper: Dettmers et al., *8-bit Optimizers via Block-wise Quantization*, ICLR 2022, https://arxiv.org/abs/2110.02861.

Every optimizer here is *update rule x state codec (x optional gradient projector)*. :class:`BlockOptimizer` does
the bookkeeping: lazy state, hyperparameter checks, non-finite gradients, percentile clipping, projection hooks,
a shape-checking ``load_state_dict``, and a chunked loop that decodes a slice of each moment to fp32, runs the
rule on it and encodes it back -- so temporaries stay cache-sized and no full fp32 copy of a moment is ever made.
Subclasses only write ``_rule`` (see lion.py, sgd.py).

Group keys (per-parameter overrides): ``codec`` ("fp32" | "bf16" | "8bit" | "4bit") or ``optim_bits``
(32 | 16 | 8 | 4); ``block_size``; ``min_8bit_size`` (smaller moments stay fp32); ``percentile_clipping``
(1..100, 100 = off); ``skip_nonfinite``; ``rank`` & co. (gradient projection, see projector.py); ``compile``
(Adam family only: run 8/4-bit moments through the fused torch.compile kernel of compiled.py).
"""
from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import Tensor

from . import shards
from .codecs import CODECS, BlockwiseCodec, Codec, get_codec
from .projector import SUPPLIED_GRAD
from .spec import Builder, OptimizerOptions, OptimizerSpec, register

_BITS = {32: "fp32", 16: "bf16", 8: "8bit", 4: "4bit"}


def _local(t: Tensor) -> Tensor:
    """FSDP2 shards parameters and gradients as DTensors: update this rank's shard (``to_local`` shares storage),
    so the state is rank-local too. Plain tensors pass through."""
    return t.to_local() if hasattr(t, "to_local") else t


class BlockOptimizer(torch.optim.Optimizer):
    """Shared core. ``moments`` lists the state tensors as (name, signed); ``_rule`` is the update."""

    moments: tuple[tuple[str, bool], ...] = ()
    default_codec = "8bit"
    supports_compile = False  # True where compiled.py implements the rule (Adam/AdamW)

    def __init__(self, params: Iterable, defaults: dict[str, Any]) -> None:
        defaults.setdefault("codec", None)
        defaults.setdefault("optim_bits", None)
        defaults.setdefault("percentile_clipping", 100)
        defaults.setdefault("skip_nonfinite", False)
        defaults.setdefault("chunk_size", 1 << 18)
        defaults.setdefault("compile", False)
        self._check(defaults, "defaults")
        self._codecs: dict[tuple, Codec] = {}
        self.nonfinite_skips = 0
        super().__init__(params, defaults)

    # ---- checks -----------------------------------------------------------------------------------------------
    def _check(self, g: dict[str, Any], where: str) -> None:
        name = type(self).__name__
        lr = g.get("lr")
        if isinstance(lr, Tensor) or not isinstance(lr, (int, float)) or not lr >= 0:
            raise ValueError(f"{name}: invalid learning rate lr={lr!r} in {where} (must be a number >= 0)")
        if "betas" in g:
            betas = g["betas"]
            if len(betas) != 2:
                raise ValueError(f"{name}: betas={betas!r} in {where} must be a pair")
            for i, b in enumerate(betas):
                if not 0.0 <= b < 1.0:
                    raise ValueError(f"{name}: invalid beta parameter at index {i}: {b} in {where} (must be in [0, 1))")
        if "eps" in g and not g["eps"] >= 0:
            raise ValueError(f"{name}: invalid eps={g['eps']!r} in {where} (must be >= 0)")
        if not g.get("weight_decay", 0.0) >= 0:
            raise ValueError(f"{name}: invalid weight_decay={g['weight_decay']!r} in {where} (must be >= 0)")
        bs = g.get("block_size")
        if isinstance(bs, bool) or not isinstance(bs, int) or bs < 2 or bs % 2:
            raise ValueError(f"{name}: block_size={bs!r} in {where} must be an even int >= 2")
        m8 = g.get("min_8bit_size")
        if isinstance(m8, bool) or not isinstance(m8, int) or m8 < 0:
            raise ValueError(f"{name}: min_8bit_size={m8!r} in {where} must be an int >= 0")
        if g.get("codec") is not None and g["codec"] not in CODECS:
            raise ValueError(f"{name}: unknown codec={g['codec']!r} in {where}; choose one of {', '.join(CODECS)}")
        if g.get("optim_bits") is not None and g["optim_bits"] not in _BITS:
            raise ValueError(f"{name}: optim_bits={g['optim_bits']!r} in {where} must be one of 32, 16, 8, 4")
        pc = g.get("percentile_clipping")
        if isinstance(pc, bool) or not isinstance(pc, int) or not 1 <= pc <= 100:
            raise ValueError(f"{name}: percentile_clipping={pc!r} in {where} must be an int in 1..100")
        cs = g.get("chunk_size")
        if isinstance(cs, bool) or not isinstance(cs, int) or cs < 1:
            raise ValueError(f"{name}: chunk_size={cs!r} in {where} must be a positive int")
        comp = g.get("compile", False)
        if not isinstance(comp, bool):
            raise TypeError(f"{name}: compile={comp!r} in {where} must be True or False")
        if comp and not self.supports_compile:
            raise ValueError(f"{name}: compile=True in {where} is only implemented for Adam/AdamW (8/4-bit states)")
        if g.get("rank") is not None:
            from .projector import check_group
            check_group(g, f"{name} {where}")

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        super().add_param_group(param_group)
        self._check(self.param_groups[-1], f"param group {len(self.param_groups) - 1}")

    # ---- codecs -----------------------------------------------------------------------------------------------
    def codec_name(self, group: dict[str, Any], numel: int, p: Tensor | None = None) -> str:
        """Which codec a moment of ``numel`` values uses in ``group`` (small moments stay fp32).

        Order: group ``codec``, group ``optim_bits``, the parameter's own ``optim_bits`` attribute (set by
        :class:`~leantrain.optim.embedding.StableEmbedding`), then the optimizer's default."""
        if group.get("codec") is not None:
            name = group["codec"]
        elif group.get("optim_bits") is not None:
            name = _BITS[group["optim_bits"]]
        elif getattr(p, "optim_bits", None) in _BITS:
            name = _BITS[p.optim_bits]
        else:
            name = self.default_codec
        if name in ("8bit", "4bit") and numel < group["min_8bit_size"]:
            return "fp32"
        return name

    def _codec(self, group: dict[str, Any], numel: int, signed: bool, p: Tensor | None = None) -> Codec:
        key = (self.codec_name(group, numel, p), signed, group["block_size"])
        if key not in self._codecs:
            self._codecs[key] = get_codec(key[0], signed, key[2])
        return self._codecs[key]

    @staticmethod
    def _projected(group: dict[str, Any], p: Tensor) -> bool:
        return group.get("rank") is not None and p.ndim == 2

    def accumulate_projected(self, p: Tensor, grad: Tensor) -> Tensor | None:
        """``--layerwise --grad-accum``: add ``grad``'s low-rank coordinates to ``p``'s accumulator (returned, fp32)
        so only r x n per matrix outlives a micro-batch; the next ``step`` of ``p`` consumes it instead of ``p.grad``
        (projector.accumulate). None when ``p`` is not projected here, or when the optimizer's own ``_update``
        reads the full gradient (Fira's residual, APOLLO's scaling, Flora, Muon, Adam-mini) -- then the caller
        accumulates the full gradient."""
        group = self._group_of(p)
        if (not self._projected(group, p) or type(self)._update is not BlockOptimizer._update
                or hasattr(p, "to_local")):
            return None
        from . import projector
        state = self.state[p]
        return projector.accumulate(grad, state, group, int(state.get("step", 0)) + 1)

    def _moment_numel(self, group: dict[str, Any], p: Tensor) -> int:
        if self._projected(group, p):
            from .projector import low_rank_shape
            r, c = low_rank_shape(p.shape, group)
            return r * c
        return p.numel()

    # ---- state ------------------------------------------------------------------------------------------------
    def _init_state(self, state: dict[str, Any], group: dict[str, Any], numel: int, p: Tensor,
                    local_numel: int | None = None, offset: int = 0) -> None:
        """Zero state for moments of ``numel`` values (the codec's choice); under FSDP2 the rank holds
        ``local_numel`` of them starting at global value ``offset``."""
        local = numel if local_numel is None else local_numel
        for name, signed in self.moments:
            for sfx, t in self._codec(group, numel, signed, p).init(local, p.device, offset).items():
                state[name + sfx] = t
        if group["percentile_clipping"] < 100:
            state["gnorm_vec"] = torch.zeros(100, dtype=torch.float32, device=p.device)

    def _enc(self, state: dict[str, Any], name: str, codec: Codec, numel: int, offset: int = 0
             ) -> dict[str, Tensor]:
        return {sfx: state[name + sfx] for sfx in codec.layout(numel, offset)}

    def _group_of(self, p: Tensor) -> dict[str, Any]:
        for group in self.param_groups:
            if any(q is p for q in group["params"]):
                return group
        raise KeyError(f"{type(self).__name__}: the tensor of shape {tuple(p.shape)} is not one of its parameters")

    def stored_numel(self, p: Tensor) -> int:
        """Values per moment of ``p`` as stored (0 before the first step; differs from ``p.numel()`` for a
        placeholder parameter such as DLRT's K and L between steps)."""
        state = self.state.get(p)
        if not state or not self.moments:
            return 0
        return self._stored_numel(state, self._group_of(p), p)

    def _stored_numel(self, state: dict[str, Any], group: dict[str, Any], p: Tensor) -> int:
        name, _ = self.moments[0]
        if name in state:  # fp32 / bf16: one value per element
            return state[name].numel()
        codes = state[name + "_codes"]  # quantized: the group's codec ignoring the small-tensor fp32 fallback
        four_bit = self.codec_name({**group, "min_8bit_size": 0}, 1, p) == "4bit"
        return 2 * codes.numel() if four_bit else codes.numel()  # 4-bit: rounded up to even, as packed

    def decoded_moments(self, p: Tensor) -> dict[str, Tensor]:
        """The moments of ``p`` as fp32 tensors of ``p``'s shape (the low-rank shape when projected), for code
        that moves optimizer state between bases (DLRT's KLS integrator). Empty before the first step."""
        state, group = self.state.get(p), self._group_of(p)
        if not state or not self.moments:
            return {}
        n = self._moment_numel(group, p)
        shape = p.shape if n == p.numel() else (n,)
        out = {}
        for name, signed in self.moments:
            codec = self._codec(group, n, signed, p)
            out[name] = codec.decode(self._enc(state, name, codec, n), shape)
        return out

    def store_moments(self, p: Tensor, moments: dict[str, Tensor]) -> None:
        """Replace the moments of ``p`` by fp32 ``moments`` of any (common) size, each re-encoded by the codec the
        group picks for that size; the step counter and other state stay."""
        state, group = self.state[p], self._group_of(p)
        old_n = self._stored_numel(state, group, p)
        for name, signed in self.moments:
            for sfx in self._codec(group, old_n, signed, p).layout(old_n):
                state.pop(name + sfx, None)
            value = moments[name].detach().float()
            for sfx, t in self._codec(group, value.numel(), signed, p).encode(value).items():
                state[name + sfx] = t

    def state_bytes(self) -> int:
        """Bytes held in optimizer state tensors (for memory reports and benchmarks)."""
        return sum(t.numel() * t.element_size() for st in self.state.values() for t in st.values()
                   if isinstance(t, Tensor))

    # ---- step -------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        items = []
        idx = 0
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is not None or SUPPLIED_GRAD in self.state.get(p, ()):
                    if p.grad is not None and p.grad.is_sparse:
                        raise TypeError(f"{type(self).__name__}: parameter {idx} has a sparse gradient (unsupported)")
                    items.append((idx, p, group))
                idx += 1
        if not items:
            return loss
        finite = self._finite_items([p for _, p, _ in items])
        for (idx, p, group), ok in zip(items, finite):  # check everything before touching anything
            if not ok and not group["skip_nonfinite"]:
                step = int(self.state[p]["step"]) + 1 if self.state.get(p) else 1
                raise ValueError(f"{type(self).__name__}: gradient of parameter {idx} (shape {tuple(p.shape)}) "
                                 f"is not finite at step {step}; set skip_nonfinite=True in its group to skip it")
        for (idx, p, group), ok in zip(items, finite):
            if ok:
                self._update(p, group)
            else:
                self.nonfinite_skips += 1
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch's, plus dropping low-rank gradients a projecting backward supplied but no step consumed."""
        super().zero_grad(set_to_none=set_to_none)
        for st in self.state.values():
            st.pop(SUPPLIED_GRAD, None)

    def _finite_items(self, params: list[Tensor]) -> list[bool]:
        """Per parameter: its gradient and its supplied low-rank gradient (galore_backward.py) are all finite."""
        grads = [[g for g in (p.grad, self.state.get(p, {}).get(SUPPLIED_GRAD)) if g is not None] for p in params]
        flags = self._finite([g for gs in grads for g in gs])
        ends = list(itertools.accumulate(len(gs) for gs in grads))
        return [all(flags[end - len(gs):end]) for gs, end in zip(grads, ends)]

    @staticmethod
    def _finite(grads: list[Tensor]) -> list[bool]:
        """One host sync for all gradients: a sum is finite unless some element is NaN/inf (or it overflows)."""
        sharded = [g for g in grads if hasattr(g, "to_local")]
        grads = [_local(g) for g in grads]
        sums = torch.stack([g.sum(dtype=torch.float32).to(grads[0].device) for g in grads])
        quick = torch.isfinite(sums).tolist()
        finite = [ok or bool(torch.isfinite(g).all()) for ok, g in zip(quick, grads)]
        if sharded:  # FSDP2: a tensor is finite only if every rank's shard is (all ranks must take one decision)
            import torch.distributed as dist
            flags = torch.tensor(finite, dtype=torch.float32)
            dist.all_reduce(flags, op=dist.ReduceOp.MIN, group=sharded[0].device_mesh.get_group())
            finite = [bool(f) for f in flags.tolist()]
        return finite

    def _update(self, p: Tensor, group: dict[str, Any]) -> None:
        state = self.state[p]
        projected = self._projected(group, p)
        # FSDP2 + projection: projector_dist projects this rank's rows of the gradient (sums split across ranks, no
        # rank holds the full gradient); the low-rank gradient and moments are replicated, the basis is the same on
        # every rank and follows the 1-process trajectory; each rank then applies only its rows of the update.
        fsdp = projected and hasattr(p.grad, "to_local")
        grad = p.grad if fsdp else _local(p.grad)
        t = self._next_step(state)
        supplied = state.pop(SUPPLIED_GRAD, None)
        if projected:
            from . import projector, projector_dist
            if supplied is not None:  # projected inside backward (galore_backward.py)
                grad = projector.project_supplied(grad, supplied, state, group, t)
            else:
                grad = (projector_dist.dtensor_project(grad, p, state, group, t) if fsdp
                        else projector.project(grad, state, group, t))
        n = grad.numel()  # this rank's values; the codec is chosen from the global size (mesh-independent)
        n_codec = n if projected else p.numel()
        geom = None if projected else shards.geometry(p)
        offset = geom.offset if geom is not None else 0
        if self.moments and self.moments[0][0] + ("" if self.codec_name(group, n_codec, p) in ("fp32", "bf16")
                                                  else "_codes") not in state:
            self._init_state(state, group, n_codec, p, n, offset)
        scale = self._gnorm_scale(grad, state, group, t, geom)
        codecs = [(name, self._codec(group, n_codec, signed, p)) for name, signed in self.moments]
        encs = [self._enc(state, name, c, n, offset) for name, c in codecs]
        if projected:
            self._projected_update(p, grad, state, group, t, scale, codecs, encs)
            return
        blockwise = any(isinstance(c, BlockwiseCodec) for _, c in codecs)
        head, tail = geom.pieces(group["block_size"]) if geom is not None and blockwise else (0, n)
        gflat = grad.reshape(-1)
        p = _local(p)
        direct = p.dtype == torch.float32 and p.is_contiguous()
        pflat = p.view(-1) if direct else p.detach().reshape(-1).float()
        run = functools.partial(self._step_range, pflat, gflat, codecs, encs, group, t, scale, offset)
        chunk = max(group["block_size"], group["chunk_size"] // group["block_size"] * group["block_size"])
        done = head  # the compiled kernel may do all (or, if compilation fails, none) of the values first
        if group.get("compile") and geom is None and all(getattr(c, "bits", 0) in (4, 8) for _, c in codecs):
            from . import compiled
            done = compiled.update(pflat, gflat, codecs, encs, group, t, scale, chunk)
        for start in range(done, tail, chunk):
            bufs = run(start, min(tail, start + chunk))
            for (_, c), e, buf in zip(codecs, encs, bufs):
                c.encode_range(e, start, buf, offset)
        if geom is not None and blockwise and shards.any_shared(geom, group["block_size"]):  # a global absmax
            self._step_shared_blocks(run, geom, group, codecs, encs, head, tail, n, offset)
        if not direct:
            p.copy_(pflat.view_as(p))

    def _step_range(self, pflat: Tensor, gflat: Tensor, codecs: list, encs: list, group: dict[str, Any], t: int,
                    scale: float, offset: int, start: int, stop: int) -> list[Tensor]:
        """Update values [start, stop) of the parameter; return the new fp32 moments of that range (not yet
        encoded: the caller encodes them once their blocks' absmax is known)."""
        lr, wd = group["lr"], group.get("weight_decay", 0.0)
        decoupled = group.get("decoupled", True)
        g = gflat[start:stop].float()
        pc = pflat[start:stop]
        if scale != 1.0:
            g = g * scale
        if wd and not decoupled:
            g = g.add(pc, alpha=wd)
        bufs = [c.decode_range(e, start, stop, offset) for (_, c), e in zip(codecs, encs)]
        u, s = self._rule(g, bufs, group, t)
        if wd and decoupled:
            pc.mul_(1.0 - lr * wd)
        pc.add_(u, alpha=-lr * s)
        return bufs

    @staticmethod
    def _step_shared_blocks(run, geom, group, codecs, encs, head: int, tail: int, n: int, offset: int) -> None:
        """Update the values in blocks this shard shares with its neighbours, then encode them with the block's
        absmax over all ranks (``shards.shared_block_absmax``: every rank calls it for this tensor)."""
        first = run(0, head) if head else [torch.empty(0)] * len(codecs)
        last = run(tail, n) if tail < n else [torch.empty(0)] * len(codecs)
        first_max, last_max = shards.shared_block_absmax(geom, group["block_size"], first, last)
        for start, values, maxima in ((0, first, first_max), (tail, last, last_max)):
            for (_, c), e, x, a in zip(codecs, encs, values, maxima):
                if x.numel():
                    c.encode_piece(e, start, x, a, offset)

    def _whole_matrix_step(self, p: Tensor, why: str) -> tuple[dict[str, Any], int]:
        """State and step number of a matrix whose rule needs the whole tensor (refused when FSDP2-sharded)."""
        if hasattr(p, "to_local"):
            raise TypeError(f"{type(self).__name__}: an FSDP2-sharded matrix of shape {tuple(p.shape)} is not "
                            f"supported ({why}); use DDP")
        state = self.state[p]
        return state, self._next_step(state)

    @staticmethod
    def _next_step(state: dict[str, Any]) -> int:
        """Count one more step of a parameter (1 on its first); the counter is float32 whatever the default dtype
        (a bf16 counter stops at 256 and freezes Adam's bias correction)."""
        if "step" not in state:
            state["step"] = torch.tensor(0.0, dtype=torch.float32)
        state["step"] += 1
        return int(state["step"])

    def _projected_update(self, p, grad, state, group, t, scale, codecs, encs) -> None:
        """Contract hook: moments live in the low-rank gradient's shape; the update is mapped back to p's shape."""
        from . import projector
        g = grad.float()
        if scale != 1.0:
            g = g * scale
        n = g.numel()
        bufs = [c.decode_range(e, 0, n).view(g.shape) for (_, c), e in zip(codecs, encs)]
        rot = state.pop("proj_rotation", None)
        if rot is not None and len(bufs) >= 1:
            m2, v2 = projector.rotate_moments(bufs[0], bufs[1] if len(bufs) > 1 else None, rot,
                                              state["proj_side"])
            bufs[0].copy_(m2)
            if v2 is not None:
                bufs[1].copy_(v2)
        lr, wd = group["lr"], group.get("weight_decay", 0.0)
        if wd and not group.get("decoupled", True):
            raise ValueError(f"{type(self).__name__}: coupled weight decay cannot be combined with projection "
                             f"(rank={group['rank']}); use AdamW-style decoupled weight decay")
        u, s = self._rule(g, bufs, group, t)
        if hasattr(p, "to_local"):  # FSDP2: this rank's rows of the full-shape update (projector_dist, local)
            from .projector_dist import dtensor_project_back_add_
            if wd:
                _local(p).mul_(1.0 - lr * wd)
            dtensor_project_back_add_(p, u, state, group, alpha=-lr * float(s))
        else:
            if wd:
                p.mul_(1.0 - lr * wd)
            projector.project_back_add_(p, u, state, group, alpha=-lr * float(s))  # no full-size temporary
        for (_, c), e, b in zip(codecs, encs, bufs):
            c.encode_range(e, 0, b.reshape(-1))

    def _gnorm_scale(self, grad: Tensor, state: dict[str, Any], group: dict[str, Any], t: int,
                     geom: shards.ShardGeometry | None = None) -> float:
        """Percentile clipping (paper sec. 2.3 / bnb ``percentile_clipping``): scale g down to the p-th percentile
        of the last 100 gradient norms of this tensor (of the whole tensor: under FSDP2 the shards' squared norms
        are summed over ranks)."""
        pc = group["percentile_clipping"]
        if pc >= 100:
            return 1.0
        vec = state.setdefault("gnorm_vec", torch.zeros(100, dtype=torch.float32, device=grad.device))
        gn2 = torch.linalg.vector_norm(grad.float()).square()
        if geom is not None:
            import torch.distributed as dist
            dist.all_reduce(gn2, group=geom.group)
        i = t % 100
        if t == 1:
            vec.fill_(gn2)
        else:
            vec[i] = gn2
        current = math.sqrt(float(vec[i]))
        clip = math.sqrt(float(torch.sort(vec).values[pc]))
        return clip / current if current > clip else 1.0

    def _rule(self, g: Tensor, bufs: list[Tensor], group: dict[str, Any], t: int) -> tuple[Tensor, float]:
        """Update moments ``bufs`` (fp32, in place) with gradient ``g``; return (direction u, scale s) such that
        the parameter moves by ``-lr * s * u``. Must not modify ``g`` in place."""
        raise NotImplementedError

    # ---- state_dict -------------------------------------------------------------------------------------------
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch's loader, plus a check that every saved state tensor fits its parameter (torch does not check)."""
        saved_groups = state_dict.get("param_groups", [])
        if len(saved_groups) == len(self.param_groups):
            for saved, group in zip(saved_groups, self.param_groups):
                merged = {**group, **{k: v for k, v in saved.items() if k != "params"}}
                for pid, p in zip(saved["params"], group["params"]):
                    st = state_dict["state"].get(pid)
                    # a zero-size parameter is a placeholder whose factor is rebuilt every step (DLRT's K, L): its
                    # state has the factor's size and its owner checks it (KLSOptimizer.load_state_dict)
                    if st and not self._projected(merged, p) and p.numel():
                        self._check_saved(pid, p, st, merged)
        compile_flags = [g.get("compile", False) for g in self.param_groups]
        super().load_state_dict(state_dict)
        for group, flag in zip(self.param_groups, compile_flags):  # how to run is this process's choice, not state
            group["compile"] = flag
        self._restore_saved_dtypes(state_dict)

    def _restore_saved_dtypes(self, state_dict: dict[str, Any]) -> None:
        """Undo torch's cast of every float state tensor to its parameter's dtype: with bf16/fp16 parameters that
        cast rounds fp32 moments, absmax scales and projector bases (resume would not continue bit-exactly).
        Each state tensor becomes an owned copy of the saved one, on the parameter's device, in the saved dtype
        (torch's loader aliases tensors with the source dict, and our updates are in place)."""
        saved_ids = [pid for g in state_dict["param_groups"] for pid in g["params"]]
        params = [p for g in self.param_groups for p in g["params"]]
        for pid, p in zip(saved_ids, params):
            st, saved = self.state.get(p), state_dict["state"].get(pid)
            if not st or not saved:
                continue
            for k, v in saved.items():
                if isinstance(v, Tensor):
                    st[k] = v.detach().to(device=p.device, copy=True)
            if isinstance(st.get("step"), Tensor):
                st["step"] = st["step"].to("cpu", torch.float32)
        for group in self.param_groups:  # state written by another format: bring it to the codec's dtypes
            for p in group["params"]:
                st = self.state.get(p)
                if not st:
                    continue
                n = self._moment_numel(group, p)
                for name, signed in self.moments:
                    for sfx, (_, dtype) in self._codec(group, n, signed, p).layout(n).items():
                        if name + sfx in st and st[name + sfx].dtype != dtype:
                            st[name + sfx] = st[name + sfx].to(dtype)

    def _check_saved(self, pid: int, p: Tensor, st: dict[str, Any], group: dict[str, Any]) -> None:
        cls = type(self).__name__
        for name, signed in self.moments:
            codec = self._codec(group, p.numel(), signed, p)
            for sfx, (shape, _) in codec.layout(p.numel()).items():
                key = name + sfx
                if key not in st:
                    raise KeyError(f"{cls}.load_state_dict: parameter {pid} (shape {tuple(p.shape)}) has no saved "
                                   f"state {key!r} for codec {codec.name!r}; saved keys: {sorted(st)}")
                got = tuple(st[key].shape)
                if got != shape:
                    raise ValueError(f"{cls}.load_state_dict: parameter {pid} has shape {tuple(p.shape)} but its "
                                     f"saved state {key!r} has shape {got} (expected {shape}, codec {codec.name!r})")


class _AdamBase(BlockOptimizer):
    moments = (("exp_avg", True), ("exp_avg_sq", False))
    supports_compile = True

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, *, block_size: int = 256,
                 min_8bit_size: int = 4096, percentile_clipping: int = 100, skip_nonfinite: bool = False,
                 codec: str | None = None, chunk_size: int = 1 << 18, decoupled: bool = True,
                 compile: bool = False) -> None:
        defaults = {"lr": lr, "betas": tuple(betas), "eps": eps, "weight_decay": weight_decay, "block_size": block_size,
                        "min_8bit_size": min_8bit_size, "percentile_clipping": percentile_clipping,
                        "skip_nonfinite": skip_nonfinite, "codec": codec, "chunk_size": chunk_size, "decoupled": decoupled,
                        "compile": compile}
        super().__init__(params, defaults)

    def _rule(self, g: Tensor, bufs: list[Tensor], group: dict[str, Any], t: int) -> tuple[Tensor, float]:
        return adam_direction(g, bufs, group, t)


def apply_decoupled(p: Tensor, step: Tensor, lr: float, weight_decay: float, scale: float = 1.0) -> None:
    """W <- W (1 - lr wd) - lr scale step, in fp32 and rounded once into a bf16/fp16 parameter."""
    w = p.detach() if p.dtype == torch.float32 else p.detach().float()
    if weight_decay:
        w.mul_(1.0 - lr * weight_decay)
    w.add_(step.view(p.shape), alpha=-lr * scale)
    if p.dtype != torch.float32:
        p.copy_(w)


def adam_direction(g: Tensor, bufs: list[Tensor], group: dict[str, Any], t: int) -> tuple[Tensor, float]:
    """torch's Adam(W) rule on fp32 moments (m, v) updated in place: (m / (sqrt(v) + eps*bc2), lr scale)."""
    m, v = bufs
    b1, b2 = group["betas"]
    m.lerp_(g, 1.0 - b1)
    v.mul_(b2).addcmul_(g, g, value=1.0 - b2)
    bc2 = math.sqrt(1.0 - b2**t)
    denom = v.sqrt().add_(group["eps"] * bc2)  # sqrt(v)/bc2 + eps, with bc2 folded into the scale
    return torch.div(m, denom, out=denom), bc2 / (1.0 - b1**t)


class AdamW(_AdamBase):
    """AdamW with fp32 states: the reference core; honours gradient-projection group keys (GaLore)."""

    default_codec = "fp32"


class AdamW8bit(_AdamBase):
    """AdamW with 8-bit block-wise dynamic-map states (≈2.03 bytes/param instead of 8)."""

    default_codec = "8bit"


class AdamW4bit(_AdamBase):
    """AdamW with 4-bit states (signed dynamic map for m, linear map without zero for v; ≈1.03 bytes/param)."""

    default_codec = "4bit"


class Adam8bit(_AdamBase):
    """Adam (L2 weight decay added to the gradient, like ``torch.optim.Adam``) with 8-bit states."""

    default_codec = "8bit"

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 0.0, **kwargs: Any) -> None:
        kwargs.setdefault("decoupled", False)
        super().__init__(params, lr, betas, eps, weight_decay, **kwargs)


# ---- registry ---------------------------------------------------------------------------------------------------
def adam_builder(cls: type[_AdamBase]) -> Builder:
    """Builder of a leantrain Adam class from the run options (``compile_optim`` -> the fused 8/4-bit kernel)."""
    def build(groups: list[dict], opts: OptimizerOptions, lr: float) -> torch.optim.Optimizer:
        extra = {"compile": True} if opts.compile_optim else {}
        return cls(groups, lr=lr, betas=opts.betas, weight_decay=opts.weight_decay, block_size=opts.block_size,
                   **extra)

    return build


def _low_precision(groups: list[dict]) -> bool:
    return any(p.dtype in (torch.float16, torch.bfloat16) for g in groups for p in g["params"])


def build_adamw(groups: list[dict], opts: OptimizerOptions, lr: float) -> torch.optim.Optimizer:
    """torch's AdamW, unless a group asks for gradient projection or a state codec, or a parameter is fp16/bf16:
    then leantrain's
    AdamW, whose moments stay fp32 (torch keeps them in the parameter's dtype, where an fp16 second moment
    underflows to 0 and the step becomes NaN)."""
    if any(g.get("rank") is not None or g.get("codec") for g in groups) or _low_precision(groups):
        return AdamW(groups, lr=lr, betas=opts.betas, weight_decay=opts.weight_decay)
    return torch.optim.AdamW(groups, lr=lr, betas=opts.betas, weight_decay=opts.weight_decay)


register(OptimizerSpec("adamw", build_adamw, states=2, codec="native",
                       summary="AdamW, fp32 moments (torch's foreach AdamW for fp32 parameters)"))
register(OptimizerSpec("adamw8bit", adam_builder(AdamW8bit), states=2, codec="8bit", compilable=True,
                       summary="AdamW, 8-bit block-wise moments", options=("block_size", "compile_optim")))
register(OptimizerSpec("adam8bit", adam_builder(Adam8bit), states=2, codec="8bit", compilable=True,
                       summary="Adam (L2 decay in the gradient), 8-bit block-wise moments", options=("block_size", "compile_optim")))
register(OptimizerSpec("adamw4bit", adam_builder(AdamW4bit), states=2, codec="4bit", compilable=True,
                       summary="AdamW, 4-bit moments", options=("block_size", "compile_optim")))
