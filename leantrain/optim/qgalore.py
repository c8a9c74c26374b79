"""Q-GaLore's two projector options for the GaLore family: int8/int4 projection matrices and lazy refresh.

Paper: Z. Zhang et al., *Q-GaLore: Quantized GaLore with INT4 Projection and Layer-Adaptive Low-Rank
Gradients*, https://arxiv.org/abs/2407.08296 (rules as in its reference projector).

* ``proj_bits`` (group key; 8 or 4, None = the basis in float): the basis P is stored block-wise (``proj_block``
  contiguous values, default 256) as asymmetric uniform codes, P ~ lo + scale * code with lo = min and
  scale = (max - min) / (2^bits - 1) per block, so |P - dequant(P)| <= scale / 2; 4-bit codes are packed two per
  byte. It is dequantized (fp32) each time it is used; a projector refresh quantizes the new basis.
* ``lazy_refresh_cos`` (threshold, None = off), ``lazy_refresh_k`` (default 5), ``lazy_refresh_gamma``
  (default 2): at every refresh the cosine similarity between the leading basis vector and the previous one is
  measured (absolute value: a singular vector's sign is arbitrary); once the last k measured cosines average at
  least the threshold, that layer's refresh interval is multiplied by gamma (a layer whose subspace has stopped
  moving skips refreshes). Its interval and next refresh step live in the layer's state.

State (plain tensors and numbers): ``proj_basis_codes`` (uint8), ``proj_basis_lo``/``proj_basis_scale`` (fp32 per
block), ``proj_basis_rows``/``proj_basis_cols``/``proj_basis_bits`` (ints) instead of ``proj_basis``; ``proj_gap``, ``proj_next`` (ints), ``proj_cos`` (fp32, the last <= k cosines),
``proj_lead`` (fp32 leading vector) for the lazy refresh. Two-sided (``proj_type="full"``) bases are not quantized.
"""
from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from typing import Any

import torch
from torch import Tensor

from .quant import pack_4bit, unpack_4bit

PROJ_BITS = (None, 4, 8)
DEFAULTS = {"proj_block": 256, "lazy_refresh_k": 5, "lazy_refresh_gamma": 2.0}
CODE_KEYS = ("proj_basis_codes", "proj_basis_lo", "proj_basis_scale")


def check(group: Mapping[str, Any], where: str) -> None:
    """Refuse bad Q-GaLore keys in one line naming the key and value."""
    bits = group.get("proj_bits")
    if bits not in PROJ_BITS and bits != 32:
        raise ValueError(f"{where}: proj_bits={bits!r} must be 4, 8 or 32/None (float basis)")
    block = group.get("proj_block", DEFAULTS["proj_block"])
    if isinstance(block, bool) or not isinstance(block, int) or block < 2:
        raise ValueError(f"{where}: proj_block={block!r} must be an int >= 2")
    cos = group.get("lazy_refresh_cos")
    if cos is not None and (isinstance(cos, bool) or not isinstance(cos, (int, float)) or not 0 <= cos <= 1):
        raise ValueError(f"{where}: lazy_refresh_cos={cos!r} must be a number in [0, 1] or None")
    k = group.get("lazy_refresh_k", DEFAULTS["lazy_refresh_k"])
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"{where}: lazy_refresh_k={k!r} must be an int >= 1")
    gamma = group.get("lazy_refresh_gamma", DEFAULTS["lazy_refresh_gamma"])
    if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or gamma < 1:
        raise ValueError(f"{where}: lazy_refresh_gamma={gamma!r} must be a number >= 1")


def quantize(x: Tensor, bits: int, block: int) -> dict[str, Tensor]:
    """Block-wise asymmetric uniform codes of ``x`` (flattened, the last block may be short)."""
    flat = x.detach().float().reshape(-1)
    pad = (-flat.numel()) % block
    blocks = torch.cat([flat, flat[-1:].expand(pad)]).view(-1, block) if pad else flat.view(-1, block)
    lo, hi = blocks.amin(dim=1), blocks.amax(dim=1)
    scale = ((hi - lo) / (2**bits - 1)).clamp_min(1e-12)
    codes = torch.round((blocks - lo[:, None]) / scale[:, None]).clamp_(0, 2**bits - 1).to(torch.uint8)
    codes = codes.reshape(-1)[: flat.numel()]
    return {"proj_basis_codes": pack_4bit(codes) if bits == 4 else codes, "proj_basis_lo": lo,
            "proj_basis_scale": scale}


def dequantize(enc: Mapping[str, Tensor], shape: tuple[int, ...], bits: int, block: int) -> Tensor:
    """fp32 tensor of ``shape`` from :func:`quantize`'s codes."""
    numel = 1
    for d in shape:
        numel *= d
    codes = enc["proj_basis_codes"]
    codes = unpack_4bit(codes, numel) if bits == 4 else codes
    idx = torch.arange(numel, device=codes.device) // block
    return (enc["proj_basis_lo"][idx] + enc["proj_basis_scale"][idx] * codes.float()).view(shape)


def quantized(group: Mapping[str, Any]) -> int | None:
    """The group's basis bit width when it stores quantized bases, else None."""
    bits = group.get("proj_bits")
    return None if bits in (None, 32) else int(bits)


def stored_basis(state: Mapping[str, Any], group: Mapping[str, Any]) -> Tensor:
    """The basis P: stored in float, or dequantized from its codes."""
    if "proj_basis" in state:
        return state["proj_basis"]
    shape = (int(state["proj_basis_rows"]), int(state["proj_basis_cols"]))
    bits = int(state["proj_basis_bits"])
    return dequantize(state, shape, bits, int(group.get("proj_block", DEFAULTS["proj_block"])))


def has_basis(state: Mapping[str, Any]) -> bool:
    return "proj_basis" in state or "proj_basis_codes" in state


def keep_basis(state: MutableMapping[str, Any], group: Mapping[str, Any], basis: Tensor) -> None:
    """Store a new basis: codes when the group asks for ``proj_bits``, else the float tensor."""
    bits = quantized(group)
    if bits is None:
        state["proj_basis"] = basis
        return
    state.pop("proj_basis", None)
    state.update(quantize(basis, bits, int(group.get("proj_block", DEFAULTS["proj_block"]))))
    state["proj_basis_rows"], state["proj_basis_cols"] = int(basis.shape[0]), int(basis.shape[1])
    state["proj_basis_bits"] = bits


def lazy(group: Mapping[str, Any]) -> bool:
    return group.get("lazy_refresh_cos") is not None


def lead_vector(basis: Tensor, side: int) -> Tensor:
    """The leading basis vector: P's first row (right projection, r x n) or first column (left, m x r)."""
    from .projector import RIGHT

    return (basis[0] if side == RIGHT else basis[:, 0]).detach().float().clone()


def record_refresh(state: MutableMapping[str, Any], group: Mapping[str, Any], basis: Tensor, side: int,
                   step: int) -> None:
    """Lazy refresh bookkeeping after a new basis at ``step``: the cosine with the previous leading vector, the
    last k of them, the layer's interval (x gamma once their mean reaches the threshold) and its next refresh."""
    gap = int(state.get("proj_gap", group.get("update_proj_gap") or 200))
    lead = lead_vector(basis, side)
    if "proj_lead" in state and state["proj_lead"].shape == lead.shape:
        cos = torch.nn.functional.cosine_similarity(state["proj_lead"], lead, dim=0).abs().reshape(1)
        k = int(group.get("lazy_refresh_k", DEFAULTS["lazy_refresh_k"]))
        queue = torch.cat([state.get("proj_cos", cos.new_zeros(0)), cos])[-k:]
        state["proj_cos"] = queue
        if queue.numel() == k and float(queue.mean()) >= float(group["lazy_refresh_cos"]):
            gap = int(gap * float(group.get("lazy_refresh_gamma", DEFAULTS["lazy_refresh_gamma"])))
    state["proj_lead"] = lead
    state["proj_gap"] = gap
    state["proj_next"] = int(step) + gap


def group_keys(options: Any) -> dict[str, Any]:
    """The Q-GaLore group keys a run's ``--extra`` gives (``proj_bits``, ``proj_block``, ``lazy_refresh_*``)."""
    extra = getattr(options, "extra", None) or {}
    names = ("proj_bits", "proj_block", "lazy_refresh_cos", "lazy_refresh_k", "lazy_refresh_gamma")
    return {k: extra[k] for k in names if k in extra}
