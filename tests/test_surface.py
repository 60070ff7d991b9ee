"""The user's surface: every verb's --help, and the README's commands."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import dsv2
from dsv2.cli import VERBS, main

ROOT = Path(__file__).resolve().parents[1]


def run(*args: str, capsys) -> subprocess.CompletedProcess:
    """Run `dsv2 ARGS` in this process (the same main() the console script calls)."""
    code = main(list(args))
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def test_module_entry_point_runs():
    out = subprocess.run([sys.executable, "-m", "dsv2", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "VERB" in out.stdout


@pytest.mark.parametrize("verb", list(VERBS))
def test_every_verb_has_help(verb, capsys):
    with pytest.raises(SystemExit) as e:
        main([verb, "--help"])
    assert e.value.code == 0
    assert verb in capsys.readouterr().out


def test_readme_opens_with_the_two_commands():
    lines = [l for l in (ROOT / "README.md").read_text().splitlines() if l.strip()]
    assert lines[1] == "```"
    assert lines[2].startswith("make demo") and lines[3].startswith("make test")


def test_readme_info_figures_are_what_the_command_prints(capsys):
    readme = (ROOT / "README.md").read_text()
    line = next(l for l in readme.splitlines() if l.startswith("dsv2 info --preset deepseek-v2 "))
    out = run("info", "--preset", "deepseek-v2", capsys=capsys)
    assert out.returncode == 0, out.stderr
    for figure in re.findall(r"[\d.,]+B|[\d,]{5,}", line.split("#", 1)[1]):
        assert figure in out.stdout
    assert run("info", "--list", capsys=capsys).stdout.split() == dsv2.config.list_presets()


def test_convert_writes_a_loadable_bf16_checkpoint(hf_checkpoint, tmp_path, capsys):
    out = run("convert", str(hf_checkpoint("v2")), str(tmp_path / "out"), "--dtype", "bfloat16", capsys=capsys)
    assert out.returncode == 0, out.stderr
    model = dsv2.load_pretrained(tmp_path / "out")
    assert next(model.parameters()).dtype == torch.bfloat16


def test_errors_are_one_line_without_traceback(tmp_path, capsys):
    out = run("convert", str(tmp_path / "missing"), str(tmp_path / "out"), capsys=capsys)
    assert out.returncode == 2
    assert "Traceback" not in out.stderr and "does not exist" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1
