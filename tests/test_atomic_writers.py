"""leantrain.atomic helpers: files appear complete under their final name, and a failed write leaves nothing."""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

from leantrain.atomic import savefig_atomic, write_safetensors_atomic, write_text_atomic


def test_safetensors_writer_round_trips_with_metadata(tmp_path):
    path = tmp_path / "w.safetensors"
    write_safetensors_atomic(path, {"a": torch.arange(4.0)}, metadata={"format": "pt"})
    assert torch.equal(load_file(path)["a"], torch.arange(4.0))
    assert [p.name for p in tmp_path.iterdir()] == ["w.safetensors"]  # no temp file left behind


def test_failed_safetensors_write_leaves_no_file(tmp_path):
    with pytest.raises(ValueError):
        write_safetensors_atomic(tmp_path / "w.safetensors", {"a": "not a tensor"})
    assert list(tmp_path.iterdir()) == []


def test_savefig_uses_the_final_suffix_as_format(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure()
    savefig_atomic(fig, tmp_path / "plot.png", dpi=20)
    savefig_atomic(fig, tmp_path / "plot.svg")
    plt.close(fig)
    assert (tmp_path / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert b"<svg" in (tmp_path / "plot.svg").read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["plot.png", "plot.svg"]


@pytest.mark.parametrize("umask,mode", [(0o022, 0o644), (0o077, 0o600), (0o002, 0o664)])
def test_files_follow_the_umask(tmp_path, umask, mode):
    """mkstemp creates 0600 files: config.json and metrics.json were private while labels.json was not."""
    old = os.umask(umask)
    try:
        write_text_atomic(tmp_path / "config.json", "{}")
    finally:
        os.umask(old)
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == mode


@pytest.mark.parametrize("umask,mode", [(0o022, 0o755), (0o077, 0o700), (0o002, 0o775)])
def test_checkpoint_folders_follow_the_umask(tmp_path, umask, mode):
    """mkdtemp creates 0700 folders: every checkpoint folder was private inside a 0755 run folder."""
    import torch

    from leantrain.checkpoint import save_checkpoint

    old = os.umask(umask)
    try:
        path = save_checkpoint(tmp_path, 1, {"w": torch.zeros(2)}, {"state": {}, "param_groups": []},
                               {}, {"cpu": torch.get_rng_state()})
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == mode
