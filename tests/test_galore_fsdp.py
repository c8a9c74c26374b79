"""GaLore under FSDP2 without a full gradient per rank (optim/projector_dist.py).

Fast: ranks simulated by threads that exchange tensors in-process (no torch.distributed); each thread holds the
torch.chunk rows of one matrix and runs projector_dist, whose results are compared with projector.py on the
whole matrix. Slow: 2 gloo processes under torchrun vs 1 process (losses and weights within 1e-5)."""
from __future__ import annotations

import sys
import threading

import pytest
import torch

from leantrain.optim import projector as pj
from leantrain.optim import projector_dist as pd

# fp32 throughout: the split sums differ from one process's matmuls by rounding only (measured: bases 1.5e-7,
# back-projected gradients 2e-8 of 3e-2, with 2 and 3 simulated ranks)
TOL = 1e-6


class _Hub:
    def __init__(self, world: int) -> None:
        self.world, self.slots = world, [None] * world
        self.barrier = threading.Barrier(world)


class ThreadComm(pd.RowComm):
    """RowComm between threads: every collective is write slot -> barrier -> read all -> barrier."""

    def __init__(self, hub: _Hub, rank: int) -> None:
        super().__init__(None, hub.world, rank)
        self.hub = hub
        self.largest = 0  # the largest result of a collective, in values (the no-full-gradient check)

    def _exchange(self, t: torch.Tensor) -> list[torch.Tensor]:
        self.hub.slots[self.rank] = t.clone()
        self.hub.barrier.wait()
        parts = list(self.hub.slots)
        self.hub.barrier.wait()
        return parts

    def all_reduce(self, t):
        parts = self._exchange(t)
        total = parts[0].clone()
        for x in parts[1:]:  # the same order on every rank: identical results, as a real all-reduce
            total += x
        self.largest = max(self.largest, t.numel())
        return t.copy_(total)

    def gather_rows(self, local, rows):
        out = torch.cat(self._exchange(local))
        self.largest = max(self.largest, out.numel())
        assert out.shape[0] == rows
        return out


def run_ranks(world: int, fn):
    """fn(comm, start, stop) on ``world`` threads; returns the per-rank results (re-raises the first error)."""
    hub, results, errors = _Hub(world), [None] * world, []

    def body(rank):
        try:
            results[rank] = fn(ThreadComm(hub, rank))
        except BaseException as exc:  # noqa: BLE001 - re-raised below
            errors.append(exc)
            hub.barrier.abort()

    threads = [threading.Thread(target=body, args=(r,)) for r in range(world)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    if errors:
        raise errors[0]
    return results


def rows_of(x: torch.Tensor, comm: pd.RowComm) -> torch.Tensor:
    a, b = pd.row_range(x.shape[0], comm.world, comm.rank)
    return x[a:b]


def gradient(m: int, n: int, seed: int = 0) -> torch.Tensor:
    """A gradient-like matrix with a decaying spectrum (a well-separated top subspace, as GaLore assumes)."""
    gen = torch.Generator().manual_seed(seed)
    k = min(m, n)
    u = torch.linalg.qr(torch.randn(m, k, generator=gen)).Q
    v = torch.linalg.qr(torch.randn(n, k, generator=gen)).Q
    return (u * 0.7 ** torch.arange(k, dtype=torch.float32)) @ v.mT


def group(**kw):
    return {"rank": 4, "oversample": 4, "update_proj_gap": 2, "scale": 0.25, **kw}


def test_row_range_is_torch_chunk():
    for m in range(10):
        for world in range(1, 5):
            x = torch.arange(m)
            chunks = torch.chunk(x, world) if m else ()
            for rank in range(world):
                a, b = pd.row_range(m, world, rank)
                want = chunks[rank].tolist() if rank < len(chunks) else []
                assert x[a:b].tolist() == want, (m, world, rank)


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("shape, proj_type", [((96, 40), "std"), ((40, 96), "std"), ((41, 64), "full"),
                                              ((64, 41), "reverse_std")])
def test_sharded_projector_matches_whole_matrix(world, shape, proj_type):
    """Refresh (randomized), projection and back-projection of the row shards == projector.py on the whole
    matrix: the subspace (P P^T, sign-free), back(low) and the rank's rows of the update, within TOL; the basis
    is bitwise the same on every rank; no rank receives m x n values."""
    g = gradient(*shape)
    grp = group(proj_type=proj_type)
    assert not pj.uses_exact_svd(shape, grp["rank"], "randomized", grp["oversample"])
    ref_state: dict = {}
    ref_low = pj.project(g, ref_state, grp, 1)
    ref_back = pj.project_back(ref_low, ref_state, grp)
    w0 = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    ref_w = pj.project_back_add_(w0.clone(), ref_low, ref_state, grp, alpha=-0.1)

    def rank_fn(comm):
        state: dict = {}
        low = pd.project(rows_of(g, comm), shape, comm, state, grp, 1)
        w = rows_of(w0, comm).clone()
        pd.project_back_add_(w, shape, comm, low, state, grp, alpha=-0.1)
        return state, low, w, comm.largest

    out = run_ranks(world, rank_fn)
    side = ref_state["proj_side"]
    for state, low, w, largest in out:
        assert state["proj_side"] == side and state["proj_refreshes"] == 1
        for key in ("proj_basis", "proj_basis_right"):
            if key in ref_state:
                a, b = ref_state[key], state[key]
                pa, pb = (a @ a.mT, b @ b.mT) if a.shape[0] >= a.shape[1] else (a.mT @ a, b.mT @ b)
                assert (pa - pb).abs().max() < TOL, key
                assert torch.equal(b, out[0][0][key])  # identical on every rank
        back = pj.project_back(low, state, grp)
        assert (back - ref_back).abs().max() < TOL
        assert largest < shape[0] * shape[1] / 2
    assert (torch.cat([w for _, _, w, _ in out]) - ref_w).abs().max() < TOL


@pytest.mark.parametrize("world", [2, 4])
def test_exact_svd_refresh_and_steps_between(world):
    """svd="full" (and the small-matrix fallback) gathers the whole matrix at the refresh only -- the result is
    projector.py's; a later non-refresh step projects the shards with the stored basis. Uneven/empty shards: 6
    rows over 4 ranks is 2, 2, 2, 0 rows."""
    for shape, grp in (((30, 20), group(svd="full")), ((6, 20), group(rank=2))):
        assert pj.uses_exact_svd(shape, grp["rank"], grp.get("svd", "randomized"), grp["oversample"])
        g1, g2 = gradient(*shape, seed=1), gradient(*shape, seed=2)
        ref_state: dict = {}
        ref = [pj.project_back(pj.project(g, ref_state, grp, t), ref_state, grp) for t, g in ((1, g1), (2, g2))]

        def rank_fn(comm, g1=g1, g2=g2, grp=grp, shape=shape):
            state: dict = {}
            return [pj.project_back(pd.project(rows_of(g, comm), shape, comm, state, grp, t), state, grp)
                    for t, g in ((1, g1), (2, g2))]

        for backs in run_ranks(world, rank_fn):
            for got, want in zip(backs, ref):
                assert (got - want).abs().max() < TOL


def test_refresh_keeps_basis_on_nonfinite_shard():
    """A non-finite value on one rank's rows keeps the old basis on *every* rank (the check is all-reduced)."""
    shape, grp = (96, 40), group()
    g = gradient(*shape)
    bad = g.clone()
    bad[-1, 0] = float("nan")  # only the last rank's rows

    def rank_fn(comm):
        state: dict = {}
        pd.project(rows_of(g, comm), shape, comm, state, grp, 1)
        pd.project(rows_of(bad, comm), shape, comm, state, grp, 3)
        return state["proj_refreshes"]

    with pytest.warns(RuntimeWarning, match="keeping the previous basis"):  # warnings are process-wide
        assert run_ranks(2, rank_fn) == [1, 1]


def test_shard_shape_is_checked():
    def rank_fn(comm):
        with pytest.raises(ValueError, match="expected rows"):
            pd.project(torch.zeros(5, 40), (96, 40), comm, {}, group(), 1)

    run_ranks(1, rank_fn)


# ---- 2 processes (torchrun, gloo) vs 1 process --------------------------------------------------------------
def _distributed_helpers():
    """BASE, assert_same_run and torchrun of tests/test_distributed.py (tests/ is not a package)."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("_test_distributed", Path(__file__).with_name("test_distributed.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
@pytest.mark.skipif(sys.platform != "linux", reason="gloo multi-process tests run on Linux")
@pytest.mark.parametrize("extra", [
    # rank 2: every projected matrix (32x32, 64x32, 32x64) takes the sharded randomized refresh (both sides);
    # gap 2 over 4 steps: refreshes at steps 1 and 3, moments kept across the second one
    ["--method", "full", "--optim", "galore-adamw", "--rank", "2", "--gap", "2"],
    # rank 8: the exact-SVD fallback (smaller side 32 <= 2 * (8 + 8)) gathers at the refresh steps only
    ["--method", "full", "--optim", "galore-adamw", "--gap", "2"],
    # GradNormLoRP: the projected direction matrices V are FSDP-sharded too. One refresh: with --gap 2 its second
    # refresh follows 1 process only to 3e-5 (loss) / 1e-4 (weights) -- under DDP as well, and with the old
    # full-gradient FSDP code, so a sensitivity of that refresh to the rounding of the averaged gradient
    ["--method", "gradnormlorp", "--optim", "adamw", "--rank", "2"],
])
def test_galore_fsdp_two_processes_match_one(tmp_path, extra):
    from leantrain.cli import main

    helpers = _distributed_helpers()
    ref, out = tmp_path / "one", tmp_path / "two"
    args = [*helpers.BASE, *extra]
    assert main(["train", *args, "--out", str(ref)]) == 0
    helpers.torchrun([*args, "--strategy", "fsdp", "--out", str(out)])
    helpers.assert_same_run(ref, out)
