"""SHiRA mask functions: sizes, determinism, exact top-K selection, custom masks, bad input."""
from __future__ import annotations

import pytest
import torch

from leantrain.adapters.shira_masks import (
    as_flat_indices,
    flat_to_indices,
    gradient_mask,
    indices_to_flat,
    magnitude_mask,
    make_mask,
    random_mask,
    shira_count,
    snip_mask,
    topk_flat,
)


def _is_sorted_unique(flat: torch.Tensor) -> bool:
    return bool((flat[1:] > flat[:-1]).all())


def test_count_r_rule_and_fraction():
    assert shira_count(20, 10, r=2) == 60  # PEFT: r * (out + in)
    assert shira_count(4096, 4096, r=32) == 262_144
    assert shira_count(100, 50, fraction=0.01) == 50
    assert shira_count(100, 50, r=2, fraction=0.5) == 2500  # fraction wins over r
    assert shira_count(3, 3, fraction=1e-9) == 1  # at least one entry


@pytest.mark.parametrize("kwargs", [{"r": 0}, {"r": 11}, {"r": None}, {"fraction": 0.0}, {"fraction": 1.5}])
def test_count_bad(kwargs):
    with pytest.raises(ValueError):
        shira_count(10, 10, **kwargs)


@pytest.mark.parametrize("shape,k", [((20, 10), 60), ((300, 400), 7000), ((8, 8), 60), ((8, 8), 64)])
def test_random_mask_size_and_determinism(shape, k):
    a = random_mask(shape, k, seed=3)
    b = random_mask(shape, k, seed=3)
    c = random_mask(shape, k, seed=4)
    assert a.dtype == torch.int64 and a.numel() == k and _is_sorted_unique(a)
    assert int(a.min()) >= 0 and int(a.max()) < shape[0] * shape[1]
    assert torch.equal(a, b)
    if k < shape[0] * shape[1]:
        assert not torch.equal(a, c)


def test_random_mask_is_roughly_uniform():
    # 2000 masks of 10 out of 100 positions: each position is picked ~200 times (binomial sd ~13.4).
    counts = torch.zeros(100)
    for seed in range(2000):
        counts[random_mask((10, 10), 10, seed)] += 1
    assert counts.sum() == 20_000
    assert counts.min() > 140 and counts.max() < 260


@pytest.mark.parametrize("n", [(30, 40), (700, 600)])  # small path and sampled-threshold path (n > 262144)
def test_topk_flat_matches_full_topk(n):
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(n, generator=g)  # continuous: no ties
    k = max(1, scores.numel() // 50)
    got = topk_flat(scores, k)
    want = torch.topk(scores.reshape(-1), k).indices.sort().values
    assert torch.equal(got, want)


def test_topk_flat_exact_when_sampled_threshold_overshoots(monkeypatch):
    import leantrain.adapters.shira_masks as masks

    monkeypatch.setattr(masks, "_SLACK", 0.5)  # force too few candidates -> exact fallback path
    scores = torch.randn(600, 600, generator=torch.Generator().manual_seed(5))
    k = 5000
    got = masks.topk_flat(scores, k)
    assert got.numel() == k and _is_sorted_unique(got)
    assert torch.equal(got, torch.topk(scores.reshape(-1), k).indices.sort().values)


def test_magnitude_gradient_snip_pick_top_scores():
    g = torch.Generator().manual_seed(1)
    w = torch.randn(30, 20, generator=g)
    grad = torch.rand(30, 20, generator=g)
    k = 50
    ref = lambda s: set(torch.topk(s.reshape(-1), k).indices.tolist())
    assert set(magnitude_mask(w, k).tolist()) == ref(w.abs())
    assert set(gradient_mask(grad, k).tolist()) == ref(grad)
    assert set(snip_mask(w, grad, k).tolist()) == ref((w * grad).abs())
    # magnitude: every kept |w| >= every dropped |w|
    kept = torch.zeros(600, dtype=torch.bool)
    kept[magnitude_mask(w, k)] = True
    assert w.abs().view(-1)[kept].min() >= w.abs().view(-1)[~kept].max()


def test_make_mask_dispatch_and_custom_callable():
    w = torch.randn(6, 5)
    dense = torch.zeros(6, 5)
    dense[0, :] = 1
    dense[5, 0] = 1
    flat = make_mask(lambda weight, k, seed, grad: dense, w, 6)
    assert flat.tolist() == [0, 1, 2, 3, 4, 25]
    rc = make_mask(lambda weight, k, seed, grad: torch.tensor([[5, 0], [0, 1]]), w, 2)
    assert rc.tolist() == [1, 25]  # (2, K) row/col indices, returned sorted
    fl = make_mask(lambda weight, k, seed, grad: torch.tensor([7, 3]), w, 2)
    assert fl.tolist() == [3, 7]
    with pytest.raises(ValueError, match="expected K=3"):
        make_mask(lambda weight, k, seed, grad: dense, w, 3)
    with pytest.raises(ValueError, match="needs gradient scores"):
        make_mask("snip", w, 3)
    with pytest.raises(ValueError, match="unknown SHiRA mask"):
        make_mask("struct", w, 3)


@pytest.mark.parametrize("bad,match", [
    (torch.tensor([1, 1, 2]), "duplicate"),
    (torch.tensor([0, 30]), "outside"),
    (torch.tensor([-1, 3]), "outside"),
    (torch.full((6, 5), 0.5), "only 0 and 1"),
    (torch.zeros(3, 3), "shape"),
    (torch.tensor([[0, 9], [0, 0]]), "outside"),
])
def test_as_flat_indices_rejects_bad_masks(bad, match):
    with pytest.raises(ValueError, match=match):
        as_flat_indices(bad, (6, 5), where="'lin0'")


def test_as_flat_indices_type_error():
    with pytest.raises(TypeError):
        as_flat_indices([1, 2], (6, 5))


def test_flat_indices_round_trip_is_peft_where_order():
    mask = torch.rand(7, 9, generator=torch.Generator().manual_seed(2)) > 0.6
    flat = as_flat_indices(mask, (7, 9))
    idx = flat_to_indices(flat, 9)
    want = torch.stack(torch.where(mask)).to(torch.int32)  # PEFT: torch.where(mask == 1), row-major
    assert idx.dtype == torch.int32 and torch.equal(idx, want)
    assert torch.equal(indices_to_flat(idx, (7, 9)), flat)


def test_scores_must_be_finite():
    s = torch.randn(10, 10)
    s[3, 3] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        topk_flat(s, 5)
    with pytest.raises(ValueError, match="K=0"):
        topk_flat(torch.randn(4), 0)
