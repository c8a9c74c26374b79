"""Run a list of named config overrides, each once, cached by the hash of its resolved config.

Overrides are dicts of ``TrainConfig`` fields, not CLI argument lists. A dict merges with a base by key (no
flag-order rules), is checked by ``TrainConfig.from_dict`` before any run starts (a typo fails the whole list at
once, not run 7 after an hour), resolves to exactly the config that is hashed for the cache, and crosses into a
subprocess as the same JSON that ``config.json`` holds. A user's CLI list becomes a base dict once, at the edge
(``base_from_cli``).

Isolation: ``isolate=True`` trains each config in its own ``python -m leantrain.experiments`` process, so peak
RSS is that run's own and a crash cannot take the others down; ``isolate=False`` runs in this process.
Cache: ``<out>/<name>/experiment.json`` records the config hash (without out/progress/overwrite, with the runner)
and the result. A run is skipped when that hash matches and ``metrics.json`` (written last by ``train``) is
there; a changed config or an interrupted run is run again, so re-invoking an interrupted list resumes it.
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib
import importlib.util
import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from ..atomic import write_text_atomic
from ..config import TrainConfig

RunFn = Callable[[TrainConfig], dict[str, Any]]
DEFAULT_RUNNER = "leantrain.experiments.engine:train_run"
SIDECAR = "experiment.json"
# Fields that say where and how loudly a run happens, not what it computes: left out of the cache hash.
VOLATILE = ("out", "progress", "overwrite")


@dataclass(frozen=True)
class Experiment:
    """One run: its folder name, the TrainConfig fields it sets, the table row it averages into, display tags."""

    name: str
    overrides: Mapping[str, Any] = field(default_factory=dict)
    group: str | None = None  # runs sharing a group (e.g. seeds) become one mean ± std table row
    tags: Mapping[str, Any] = field(default_factory=dict)  # extra columns for tables (lr label, seed, ...)

    @property
    def label(self) -> str:
        return self.group or self.name


@dataclass
class Result:
    """What one run produced: metrics, or a one-line error; ``cached`` when an earlier run was reused."""

    experiment: Experiment
    run_dir: Path
    config: dict[str, Any]
    metrics: dict[str, Any] | None = None
    error: str | None = None
    cached: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None

    def row(self) -> dict[str, Any]:
        """One flat dict (config, tags, metrics, name, label, run_dir) for the table and plot helpers."""
        row = {**self.config, **self.experiment.tags, **(self.metrics or {}),
               "name": self.experiment.name, "label": self.experiment.label, "run_dir": str(self.run_dir)}
        if self.error is not None:
            row["error"] = self.error
        return row


def train_run(cfg: TrainConfig) -> dict[str, Any]:
    """The default runner: ``leantrain.train`` (imported late so ``--help`` paths stay light)."""
    from ..train import train

    return train(cfg)


def load_runner(spec: str) -> RunFn:
    """``"module:function"`` or ``"path/to/file.py:function"`` -> the function (a string, so a child process can
    import it too; a file path lets a benchmark script outside the package be its own runner)."""
    module, _, attr = spec.rpartition(":")
    if module.endswith(".py"):
        file_spec = importlib.util.spec_from_file_location(f"_runner_{Path(module).stem}", module)
        loaded = importlib.util.module_from_spec(file_spec)
        file_spec.loader.exec_module(loaded)
        return getattr(loaded, attr)
    return getattr(importlib.import_module(module), attr)


def runner_id(runner: str | RunFn) -> str:
    return runner if isinstance(runner, str) else f"{runner.__module__}:{runner.__qualname__}"


def one_line(exc: BaseException) -> str:
    """``Type: first line of the message``: what a failed run reports."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


class _RaisingParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a ValueError (one line) instead of usage text and exit 2."""

    def error(self, message: str):  # type: ignore[override]
        raise ValueError(f"train options: {message}")


def base_from_cli(argv: Sequence[str]) -> dict[str, Any]:
    """``leantrain train`` options -> the TrainConfig fields they set (every field, defaults resolved)."""
    from ..commands.train import config_from_args, register

    parser = _RaisingParser(prog="leantrain")
    register(parser.add_subparsers())
    cfg = config_from_args(parser.parse_args(["train", *argv]))
    return dataclasses.asdict(cfg)


def resolve(experiment: Experiment, base: Mapping[str, Any], out: Path) -> TrainConfig:
    """Base + overrides -> a validated TrainConfig writing to ``out/<name>`` (a cache miss replaces the folder)."""
    values = {**base, **experiment.overrides, "out": str(out / experiment.name), "overwrite": True}
    return TrainConfig.from_dict(values)


def config_hash(config: Mapping[str, Any], runner: str) -> str:
    """Hash of what a run computes: the resolved config minus VOLATILE fields, plus the runner."""
    kept = {k: v for k, v in config.items() if k not in VOLATILE}
    blob = json.dumps({"config": kept, "runner": runner}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_metrics(run_dir: Path, digest: str) -> dict[str, Any] | None:
    """The recorded result when ``run_dir`` holds a complete run of the same config hash, else None."""
    sidecar = run_dir / SIDECAR
    if not (sidecar.is_file() and (run_dir / "metrics.json").is_file()):
        return None
    try:
        record = json.loads(sidecar.read_text())
    except (OSError, ValueError):
        return None
    return record.get("metrics") if record.get("hash") == digest else None


def _last_line(path: Path) -> str | None:
    lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    return lines[-1] if lines else None


def run_isolated(cfg: TrainConfig, runner: str, log: Path, env: Mapping[str, str]) -> tuple[dict | None, str | None]:
    """Train ``cfg`` in a child process (output to ``log``); (metrics, None) or (None, the log's last line)."""
    with tempfile.TemporaryDirectory() as tmp:
        spec, result = Path(tmp) / "spec.json", Path(tmp) / "result.json"
        spec.write_text(json.dumps({"config": json.loads(cfg.to_json()), "runner": runner}))
        cmd = [sys.executable, "-m", "leantrain.experiments", str(spec), str(result)]
        with log.open("w") as handle:
            proc = subprocess.run(cmd, stdout=handle, stderr=subprocess.STDOUT, env={**os.environ, **env}, check=False)
        if proc.returncode == 0 and result.is_file():
            return json.loads(result.read_text()), None
        if proc.returncode < 0:  # e.g. the out-of-memory killer: the log's last line would be a progress bar
            return None, f"killed by {signal.Signals(-proc.returncode).name}"
        return None, _last_line(log) or f"exit code {proc.returncode}"


def run_in_process(cfg: TrainConfig, runner: str | RunFn) -> tuple[dict | None, str | None]:
    """Train ``cfg`` here; an exception becomes a one-line error (Ctrl-C still stops the list)."""
    fn = load_runner(runner) if isinstance(runner, str) else runner
    try:
        return fn(cfg), None
    except Exception as exc:  # noqa: BLE001 -- one failed run must not stop the others
        return None, one_line(exc)


@dataclass(frozen=True)
class _Plan:
    """How every run of one list is executed (shared by the sequential and the threaded path)."""

    runner: str | RunFn
    isolate: bool
    env: Mapping[str, str]


def run_one(experiment: Experiment, cfg: TrainConfig, plan: _Plan) -> Result:
    """Reuse a cached run or train it, then record its hash and result next to metrics.json."""
    run_dir = Path(cfg.out)
    config = json.loads(cfg.to_json())
    digest = config_hash(config, runner_id(plan.runner))
    cached = cached_metrics(run_dir, digest)
    if cached is not None:
        return Result(experiment, run_dir, config, metrics=cached, cached=True)
    if plan.isolate:
        metrics, error = run_isolated(cfg, str(plan.runner), run_dir.parent / f"{experiment.name}.log", plan.env)
    else:
        metrics, error = run_in_process(cfg, plan.runner)
    if error is None and not (run_dir / "metrics.json").is_file():
        error = f"no metrics.json in {run_dir} (the run did not finish)"
    if error is not None:
        return Result(experiment, run_dir, config, error=error)
    record = {"hash": digest, "name": experiment.name, "metrics": metrics}
    write_text_atomic(run_dir / SIDECAR, json.dumps(record, indent=1, default=str) + "\n")
    return Result(experiment, run_dir, config, metrics=metrics)


def _check_names(experiments: Sequence[Experiment]) -> None:
    seen: set[str] = set()
    for exp in experiments:
        if exp.name in seen or not exp.name or "/" in exp.name:
            raise ValueError(f"experiment name {exp.name!r} must be unique, non-empty and without '/'")
        seen.add(exp.name)


def run_experiments(experiments: Sequence[Experiment], out: Path, *, base: Mapping[str, Any] | None = None,
                    runner: str | RunFn = DEFAULT_RUNNER, isolate: bool = True, jobs: int = 1,
                    env: Mapping[str, str] | None = None, progress: bool = True,
                    desc: str = "runs") -> list[Result]:
    """Run every experiment under ``out/<name>`` (cached ones are reused) and return results in list order.

    Every config is validated before the first run. A failed run prints one line and the others go on;
    Ctrl-C stops the list (finished runs stay cached). ``jobs > 1`` runs that many isolated processes at once.
    """
    out = Path(out)
    _check_names(experiments)
    if isolate and not isinstance(runner, str):
        raise TypeError("isolated runs need the runner as a 'module:function' string")
    configs = [resolve(exp, base or {}, out) for exp in experiments]
    out.mkdir(parents=True, exist_ok=True)
    plan = _Plan(runner, isolate, dict(env or {}))
    results: list[Result | None] = [None] * len(experiments)
    with tqdm(total=len(experiments), desc=desc, unit="run", disable=not progress) as bar:
        starting = bar.set_postfix_str
        for index, result in _execute(experiments, configs, plan, jobs if isolate else 1, starting):
            results[index] = result
            _report(bar, result)
    return [r for r in results if r is not None]


def _execute(experiments: Sequence[Experiment], configs: Sequence[TrainConfig], plan: _Plan, jobs: int,
             starting: Callable[[str], Any]):
    """Yield (index, result) as runs finish: one at a time (naming each as it starts), or ``jobs`` isolated
    processes at once."""
    if jobs <= 1:
        for index, (exp, cfg) in enumerate(zip(experiments, configs)):
            starting(exp.name)
            yield index, run_one(exp, cfg, plan)
        return
    pool = ThreadPoolExecutor(jobs)
    try:
        futures = {pool.submit(run_one, exp, cfg, plan): i for i, (exp, cfg) in enumerate(zip(experiments, configs))}
        for future in as_completed(futures):
            yield futures[future], future.result()
    finally:  # on Ctrl-C the running children stop with it; the queued runs must not start
        pool.shutdown(wait=True, cancel_futures=True)


def _report(bar: tqdm, result: Result) -> None:
    """Advance the bar; a failed run gets one line of its own."""
    if result.cached:
        bar.set_postfix_str(f"{result.experiment.name} (cached)")
    if not result.ok:
        bar.write(f"{result.experiment.name}: failed: {result.error}", file=sys.stderr)
    bar.update()


def child_main(argv: Sequence[str]) -> int:
    """Entry of an isolated run: ``python -m leantrain.experiments SPEC RESULT`` (last log line = the error)."""
    import traceback

    spec_path, result_path = argv
    spec = json.loads(Path(spec_path).read_text())
    try:
        metrics = load_runner(spec["runner"])(TrainConfig.from_dict(spec["config"]))
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 -- the parent reports it in one line
        traceback.print_exc()
        print(one_line(exc), file=sys.stderr, flush=True)
        return 1
    write_text_atomic(Path(result_path), json.dumps(metrics, default=str))
    return 0
