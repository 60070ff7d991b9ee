"""`dsv2 serve` as a user runs it: a child process, its start-up log, its flag errors."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request

import pytest


def test_help(capsys):
    from dsv2.cli import main
    with pytest.raises(SystemExit) as e:
        main(["serve", "--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "--api-key" in out and "--max-queue" in out


@pytest.mark.parametrize("flags,word", [(["--slots", "0"], "--slots"), (["--port", "70000"], "--port"),
                                        (["--max-queue", "-1"], "--max-queue"), (["--dtype", "fp8"], "dtype"),
                                        (["--max-len", "99999"], "max_len")])
def test_bad_flags_are_one_sentence(model_dir, capsys, flags, word):
    from dsv2.cli import main
    try:
        code = main(["serve", str(model_dir), *flags])
    except SystemExit as e:   # refused by argparse itself (a --dtype outside its choices)
        code = e.code
    assert code == 2
    err = capsys.readouterr().err
    assert word in err and "Traceback" not in err


def test_missing_checkpoint(tmp_path, capsys):
    from dsv2.cli import main
    assert main(["serve", str(tmp_path / "nope")]) == 2
    assert "tokenizer.json" in capsys.readouterr().err


def test_serve_subprocess_logs_capacity(model_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "dsv2", "serve", str(model_dir), "--port", str(port), "--slots", "2",
           "--max-len", "128"]
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=dict(os.environ, OMP_NUM_THREADS="1"))
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, log.read_text()
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=2) as r:
                    models = json.load(r)
                break
            except OSError:
                assert time.monotonic() < deadline, log.read_text()
                time.sleep(0.2)
        assert models["data"][0]["id"] == "tiny-chat" and models["data"][0]["max_model_len"] == 128
        text = log.read_text()
        assert "holds 256 tokens: 2 slots x 128 positions, so at most 2 requests run at once" in text
    finally:
        proc.terminate()
        proc.wait(30)
    # uvicorn shuts down gracefully on SIGTERM, then re-raises the signal (exit status -15).
    assert "Application shutdown complete" in log.read_text()
