"""No code path unpickles a user-provided file.

A malicious pickle whose ``__reduce__`` writes a marker file is planted wherever leantrain reads tensors
(legacy ``adapter_model.bin``, a model folder's ``pytorch_model.bin``, checkpoint / optimizer state files,
quantized and DLRT weight files): each load must refuse or ignore it, and the marker must never appear.
A static check over ``leantrain/`` pins the rule in the source: ``torch.load`` only with ``weights_only=True``,
no ``pickle``/``dill``/``joblib``/``np.load(allow_pickle=True)``.
"""
from __future__ import annotations

import ast
import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from torch import nn

import leantrain
from leantrain import adapters
from leantrain import checkpoint as ckpt
from leantrain.adapters import LoraConfig

SOURCE = Path(leantrain.__file__).resolve().parent


class Exploit:
    """Unpickling this calls ``pathlib.Path(marker).write_text('pwned')``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (Path(self.marker), "pwned"))


def plant(path: Path, marker: Path) -> None:
    """A file torch.load(weights_only=False) would happily execute (zip format, like torch.save writes)."""
    torch.save({"weight": Exploit(marker)}, path)


def test_exploit_really_fires_when_unpickled(tmp_path):
    """Guard against a test that cannot fail: the planted file does run code under a plain unpickler."""
    marker, evil = tmp_path / "marker", tmp_path / "evil.bin"
    plant(evil, marker)
    torch.load(evil, weights_only=False)
    assert marker.read_text() == "pwned"


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.lin0, self.lin1 = nn.Linear(10, 20), nn.Linear(20, 2)


def _refused_or_ignored(fn, marker: Path) -> None:
    try:
        fn()
    except Exception:  # noqa: BLE001, S110 - any refusal is fine here; the marker is what matters
        pass
    assert not marker.exists(), "a user-provided pickle was executed"


def test_legacy_adapter_bin_is_not_unpickled(tmp_path):
    marker, d = tmp_path / "marker", tmp_path / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["lin0"]}))
    plant(d / "adapter_model.bin", marker)
    with pytest.raises(Exception) as info:
        adapters.load(MLP(), d)
    assert not marker.exists()
    assert "weights_only" in str(info.value) or "Unsupported" in str(info.value) or "global" in str(info.value)


def test_adapter_bin_next_to_safetensors_is_ignored(tmp_path):
    marker, d = tmp_path / "marker", tmp_path / "adapter"
    model = MLP()
    adapters.inject(model, LoraConfig(r=2, target_modules=["lin0"], init="random"))
    adapters.save(model, d)
    plant(d / "adapter_model.bin", marker)
    adapters.load(MLP(), d)
    assert not marker.exists()


def test_model_folder_pytorch_model_bin_is_not_unpickled(tmp_path):
    from leantrain.models import build_classifier, resolve_model_dir

    marker, d = tmp_path / "marker", tmp_path / "model"
    d.mkdir()
    shutil.copy(resolve_model_dir("minilm") / "config.json", d / "config.json")
    plant(d / "pytorch_model.bin", marker)
    _refused_or_ignored(lambda: build_classifier(str(d), 2), marker)


@pytest.fixture()
def checkpoint(tmp_path) -> Path:
    model = MLP()
    opt = torch.optim.AdamW(model.parameters())
    model.lin1(model.lin0(torch.randn(2, 10))).sum().backward()
    opt.step()
    return ckpt.save_checkpoint(tmp_path / "run", 1, model.state_dict(), opt.state_dict(), {},
                                {"cpu": torch.get_rng_state()})


@pytest.mark.parametrize("name", ["model.safetensors", "optimizer.safetensors", "trainer.safetensors"])
@pytest.mark.parametrize("resign", [False, True])
def test_checkpoint_files_are_not_unpickled(checkpoint, tmp_path, name, resign):
    marker = tmp_path / "marker"
    plant(checkpoint / name, marker)
    if resign:  # even a manifest that vouches for the pickle does not make it loadable
        manifest = json.loads((checkpoint / "manifest.json").read_text())
        manifest["files"][name] = hashlib.sha256((checkpoint / name).read_bytes()).hexdigest()
        (checkpoint / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ckpt.CheckpointError):
        ckpt.load_checkpoint(checkpoint)
    assert not marker.exists()


@pytest.mark.parametrize("extra", ["optimizer.pt", "optimizer.bin", "model.pt", "pytorch_model.bin", "rng.pkl"])
def test_pickles_dropped_into_a_checkpoint_are_ignored(checkpoint, tmp_path, extra):
    marker = tmp_path / "marker"
    plant(checkpoint / extra, marker)
    ckpt.load_checkpoint(checkpoint)
    assert not marker.exists()


def test_quantized_and_lowrank_files_are_not_unpickled(tmp_path):
    from leantrain.lowrank import convert_to_lowrank, load_lowrank, save_lowrank
    from leantrain.quant import load_quantized, quantize, save_quantized

    marker = tmp_path / "marker"
    model = MLP()
    quantize(model, bits=8, targets=["lin0"], double_quant=False, block_size=64)
    qdir = save_quantized(model, tmp_path / "q")
    plant(qdir / "quantized.safetensors", marker)
    _refused_or_ignored(lambda: load_quantized(MLP(), qdir), marker)
    lr = MLP()
    convert_to_lowrank(lr, "all-linear", rank=2)
    path = save_lowrank(lr, tmp_path / "dlrt.safetensors")
    plant(path, marker)
    fresh = MLP()
    convert_to_lowrank(fresh, "all-linear", rank=2)
    _refused_or_ignored(lambda: load_lowrank(fresh, path), marker)


def test_resume_with_pickled_checkpoint_is_refused(tmp_path, capsys):
    from leantrain.cli import main

    out, marker = tmp_path / "run", tmp_path / "marker"
    args = ["--model", "tiny", "--train-size", "96", "--val-size", "48", "--max-length", "24", "--batch-size", "8",
            "--no-progress", "--out", str(out)]
    assert main(["train", *args, "--steps", "1", "--save-every", "1"]) == 0
    latest = ckpt.latest_checkpoint(out)
    for name in ("model.safetensors", "optimizer.safetensors"):
        plant(latest / name, marker)
    assert main(["train", "--out", str(out), "--resume", "--steps", "2", "--no-progress"]) == 2
    assert "leantrain: error:" in capsys.readouterr().err
    assert not marker.exists()


# --- static check over the source tree ------------------------------------------------------------------------

def _calls(tree: ast.AST):
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            yield node


def _dotted(node: ast.AST) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Name):
        return node.id
    return "?"


# DCP writes its .metadata file with pickle; this module reads it through an Unpickler subclass whose find_class
# allows only DCP's metadata classes, torch sizes/dtypes/layouts and paths (tested below with a planted exploit).
RESTRICTED_UNPICKLERS = {"leantrain/dcp_checkpoint.py"}


def _restricted_unpickler_problems(tree: ast.AST, rel: Path) -> list[str]:
    """In an allowed file, ``pickle`` may only be used as pickle.Unpickler (subclassed with find_class) and
    pickle.UnpicklingError."""
    problems = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "pickle" \
                and node.attr not in ("Unpickler", "UnpicklingError"):
            problems.append(f"{rel}:{node.lineno} uses pickle.{node.attr}")
    classes = [n for n in ast.walk(tree) if isinstance(n, ast.ClassDef)
               and any(_dotted(b) == "pickle.Unpickler" for b in n.bases)]
    if not classes or not all(any(isinstance(f, ast.FunctionDef) and f.name == "find_class" for f in c.body)
                              for c in classes):
        problems.append(f"{rel}: a pickle.Unpickler subclass without find_class")
    return problems


def test_dcp_metadata_exploit_is_refused(tmp_path):
    """A DCP checkpoint whose .metadata is a malicious pickle (with a matching manifest) does not run it."""
    from leantrain.dcp_checkpoint import saved_tensors

    marker = tmp_path / "marker"
    (tmp_path / "dcp").mkdir()
    import pickle as std_pickle
    (tmp_path / "dcp" / ".metadata").write_bytes(std_pickle.dumps(Exploit(marker)))
    with pytest.raises(std_pickle.UnpicklingError, match="write_text"):
        saved_tensors(tmp_path)
    assert not marker.exists()


def test_source_never_unpickles():
    offenders = []
    files = sorted(SOURCE.rglob("*.py"))
    assert len(files) > 20, "the leantrain package was not found"
    torch_loads = 0
    for file in files:
        text = file.read_text()
        tree = ast.parse(text)
        rel = file.relative_to(SOURCE.parent)
        if str(rel) in RESTRICTED_UNPICKLERS:
            offenders += _restricted_unpickler_problems(tree, rel)
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "cPickle", "dill", "joblib", "cloudpickle", "shelve")
                       for n in names):
                    offenders.append(f"{rel}:{node.lineno} imports a pickle module")
        for call in _calls(tree):
            name = _dotted(call.func)
            kw = {k.arg: k.value for k in call.keywords}
            if name.endswith("torch.load") or name == "load" and "weights_only" in kw:
                torch_loads += 1
                value = kw.get("weights_only")
                if not (isinstance(value, ast.Constant) and value.value is True):
                    offenders.append(f"{rel}:{call.lineno} torch.load without weights_only=True")
            if name.split(".")[-1] in ("loads", "load") and name.split(".")[0] in ("pickle", "dill", "joblib"):
                offenders.append(f"{rel}:{call.lineno} {name}")
            if name.endswith(("np.load", "numpy.load")):
                value = kw.get("allow_pickle")
                if value is not None and not (isinstance(value, ast.Constant) and value.value is False):
                    offenders.append(f"{rel}:{call.lineno} np.load(allow_pickle=...)")
        if "torch.load(" in text:  # text-level backstop for aliased calls the AST walk would not recognise
            for i, line in enumerate(text.splitlines(), 1):
                if "torch.load(" in line and "weights_only=True" not in line and not line.lstrip().startswith("#") \
                        and "``" not in line:
                    offenders.append(f"{rel}:{i} torch.load( on a line without weights_only=True")
    assert not offenders, "\n".join(offenders)
    assert torch_loads >= 1  # the adapter loader's legacy .bin path is seen, so the check is live


def test_static_check_catches_a_bad_call(tmp_path):
    """The AST check above flags the patterns it claims to (no test that cannot fail)."""
    bad = "import torch\nimport pickle\nx = torch.load(p)\ny = pickle.load(f)\n"
    tree = ast.parse(bad)
    names = [_dotted(c.func) for c in _calls(tree)]
    assert "torch.load" in names and "pickle.load" in names
