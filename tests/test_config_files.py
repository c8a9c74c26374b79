"""``leantrain train --config`` reads JSON, TOML and YAML alike; ``--extra KEY=VALUE`` sets TrainConfig.extra."""
from __future__ import annotations

import json

import pytest

from leantrain.cli import build_parser
from leantrain.commands.train import config_from_args

BODIES = {
    "json": '{"method": "dora", "rank": 4, "betas": [0.8, 0.99], "extra": {"note": "x"}}',
    "toml": 'method = "dora"\nrank = 4\nbetas = [0.8, 0.99]\n[extra]\nnote = "x"\n',
    "yaml": "method: dora\nrank: 4\nbetas: [0.8, 0.99]\nextra:\n  note: x\n",
}


def _cfg(argv):
    return config_from_args(build_parser().parse_args(["train", *argv]))


@pytest.mark.parametrize("kind", sorted(BODIES))
def test_every_format_gives_the_same_config(kind, tmp_path):
    path = tmp_path / f"run.{kind}"
    path.write_text(BODIES[kind])
    cfg = _cfg(["--config", str(path), "--rank", "6"])  # a flag wins over the file
    assert (cfg.method, cfg.rank, cfg.betas, cfg.extra) == ("dora", 6, (0.8, 0.99), {"note": "x"})


def test_extra_flags_merge_with_the_file(tmp_path):
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"extra": {"keep": 1, "dlrt_freeze_other": False}}))
    cfg = _cfg(["--config", str(path), "--extra", "dlrt_freeze_other=true", "--extra", "tag=hello world"])
    assert cfg.extra == {"keep": 1, "dlrt_freeze_other": True, "tag": "hello world"}


@pytest.mark.parametrize("name,body,needle", [
    ("bad.toml", "method = ", "not valid toml"),
    ("bad.yaml", "- just\n- a list\n", "must hold a mapping"),
    ("bad.json", "{", "not valid json"),
])
def test_bad_config_files_are_one_line(tmp_path, capsys, name, body, needle):
    from leantrain.cli import main

    path = tmp_path / name
    path.write_text(body)
    assert main(["train", "--config", str(path), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and needle in err[0] and name in err[0], err
