"""One dtype parser and CLI options defined once: every verb offers the same names and flags."""

from __future__ import annotations

import shutil

import pytest
import torch

import dsv2
from dsv2.cli import build_parser
from dsv2.dtypes import DTYPE_NAMES, parse_dtype


def _verbs():
    sub = next(a for a in build_parser()._actions if a.dest == "verb")
    return sub.choices


def _option(parser, flag):
    return next((a for a in parser._actions if flag in a.option_strings), None)


def test_parse_dtype_takes_exactly_the_names_its_message_lists():
    assert parse_dtype("float32") is torch.float32 and parse_dtype("bfloat16") is torch.bfloat16
    assert parse_dtype(None) is None and parse_dtype(torch.float16) is torch.float16   # Python callers: as given
    with pytest.raises(ValueError) as e:
        parse_dtype("float16")
    assert str(e.value) == "unknown dtype 'float16': use float32 or bfloat16."


@pytest.mark.parametrize("load", [
    lambda path: dsv2.load_pretrained(path, dtype="float16"),
    lambda path: dsv2.LLM(path, dtype="float16"),
    lambda path: __import__("dsv2.serve.launch", fromlist=["build_server"]).build_server(path, path, dtype="float16"),
], ids=["load_pretrained", "LLM", "build_server"])
def test_every_entry_point_refuses_a_dtype_with_the_same_sentence(load, hf_checkpoint, tmp_path):
    shutil.copytree(hf_checkpoint("v2"), tmp_path / "m")
    (tmp_path / "m" / "tokenizer.json").write_text("{}")   # the server looks for it before loading
    with pytest.raises(ValueError, match=r"^unknown dtype 'float16': use float32 or bfloat16\.$"):
        load(tmp_path / "m")


def test_every_verb_with_dtype_offers_the_same_names():
    verbs = _verbs()
    with_dtype = {name for name, p in verbs.items() if _option(p, "--dtype")}
    assert {"info", "convert", "export", "generate", "chat", "serve"} <= with_dtype
    for name in with_dtype:   # convert also writes DeepSeek's FP8 format
        assert tuple(_option(verbs[name], "--dtype").choices) == DTYPE_NAMES + (("fp8",) if name == "convert" else ()), name


def test_native_on_every_decoding_verb_and_runtime_flags_outside_sampling():
    verbs = _verbs()
    for name in ("generate", "chat", "serve", "bench"):
        assert _option(verbs[name], "--native") and _option(verbs[name], "--no-native"), name
        assert verbs[name].parse_args(["x"] if name != "bench" else []).native is None, name
    for name in ("generate", "chat", "serve"):
        groups = {a.dest: g.title for g in verbs[name]._action_groups for a in g._group_actions}
        assert {groups[k] for k in ("threads", "compile", "quantize", "native")} == \
            {"runtime (how the engine runs, not what it generates)"}, name
    args = verbs["generate"].parse_args(["ckpt", "--no-native", "--quantize", "int8", "--threads", "1"])
    assert (args.native, args.quantize, args.threads) == (False, "int8", 1)
