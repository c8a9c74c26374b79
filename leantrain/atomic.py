"""Atomic file writes: a temp file in the target's folder, then ``os.replace``, so a crash (or a full disk)
never leaves a half-written file under the final name. Every file leantrain writes goes through here."""
from __future__ import annotations

import os
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any


def atomic_write(path: str | Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp_path)`` to produce the file, then rename it over ``path``; on failure remove the temp."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~umask())  # mkstemp makes 0600 files; the user's umask decides, as for open()
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def umask() -> int:
    """The process umask (reading it means setting it; restored at once)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def temp_dir(parent: str | Path, prefix: str) -> Path:
    """A fresh directory in ``parent`` to fill and rename into place; mkdtemp makes it 0700, the user's umask
    decides instead (a checkpoint folder should read like the run folder around it)."""
    tmp = Path(tempfile.mkdtemp(dir=parent, prefix=prefix))
    os.chmod(tmp, 0o777 & ~umask())
    return tmp


def follow_umask(root: str | Path) -> None:
    """Give every file and folder under ``root`` the mode ``open()``/``mkdir()`` would: writers that create files
    themselves (safetensors' ``save_file``, transformers) make some 0600, while the user's umask should decide."""
    mask = umask()
    for path in Path(root).rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    atomic_write(path, lambda tmp: Path(tmp).write_text(text))


def write_safetensors_atomic(path: str | Path, tensors: Mapping[str, Any],
                             metadata: Mapping[str, str] | None = None) -> None:
    """Save ``tensors`` as safetensors at ``path`` atomically (safetensors is imported only when used)."""
    from safetensors.torch import save_file

    atomic_write(path, lambda tmp: save_file(dict(tensors), tmp, metadata=dict(metadata) if metadata else None))


def savefig_atomic(fig: Any, path: str | Path, **kwargs: Any) -> None:
    """``fig.savefig`` to ``path`` atomically; the format comes from ``path``'s suffix, not the temp name's."""
    fmt = kwargs.pop("format", None) or Path(path).suffix.lstrip(".") or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, **kwargs))
