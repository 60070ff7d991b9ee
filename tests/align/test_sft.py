"""`dsv2 sft` end to end on a tiny checkpoint: export, transformers and serve round trips, exact
resume, loss normalised over the supervised tokens of the whole step, and the demo stage."""

from __future__ import annotations

import json
import os

import pytest
import torch

from dsv2.align.sft import SFTTrainer, load_sft_config
from dsv2.cli import main

from align_helpers import SFT_CHATS as CHATS, check_exact_resume


def overrides(base, files, out, **extra):
    kv = {"init_from": base, "data.train": files / "train.jsonl", "data.val": files / "val.jsonl", "out_dir": out,
          "epochs": 0, "steps": 4, "data.seq_len": 64, "batch.micro_batch": 2, "batch.start": 4, "batch.final": 4,
          "precision": "fp32", "threads": 1, "log_every": 1, "eval_every": 2, "save_every": 100,
          "optim.warmup_steps": 1, "optim.lr": 1e-3, "moe.drop_tokens": False} | extra
    return [f"{k}={v}" for k, v in kv.items()]


@pytest.fixture(scope="module")
def sft_run(sft_base, chat_files, tmp_path_factory):
    out = tmp_path_factory.mktemp("sft_run")
    code = main(["sft", "--config", "demo", *overrides(sft_base, chat_files, out)])
    assert code == 0
    return out


def test_sft_trains_and_exports_with_the_chat_template(sft_run, sft_base, capsys):
    hf = sft_run / "hf"
    cfg = json.loads((hf / "tokenizer_config.json").read_text())
    assert "'Assistant: ' + message['content'] + eos_token" in cfg["chat_template"]
    records = [json.loads(l) for l in (sft_run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records if r["kind"] == "val"] == [2, 4]
    from dsv2 import load_pretrained
    a, b = load_pretrained(sft_base), load_pretrained(hf)
    assert any(not torch.equal(p, q) for p, q in zip(a.state_dict().values(), b.state_dict().values()))


def test_the_export_loads_in_transformers_with_the_same_logits(sft_run):
    from transformers import DeepseekV2ForCausalLM, PreTrainedTokenizerFast

    from dsv2 import Tokenizer, load_pretrained
    hf = sft_run / "hf"
    ours = load_pretrained(hf, dtype=torch.float32)
    theirs = DeepseekV2ForCausalLM.from_pretrained(hf).eval()
    ids = torch.tensor([Tokenizer(hf).encode("User: 你好\n\nAssistant: 7")])
    with torch.no_grad():
        assert torch.allclose(ours(ids), theirs(ids).logits.float(), atol=1e-4, rtol=1e-4)
    tk = PreTrainedTokenizerFast(tokenizer_file=str(hf / "tokenizer.json"), **{
        k: v for k, v in json.loads((hf / "tokenizer_config.json").read_text()).items()
        if k in ("bos_token", "eos_token", "chat_template")})
    assert tk.apply_chat_template(CHATS[1], tokenize=False) == Tokenizer(hf).apply_chat_template(
        CHATS[1], add_generation_prompt=False)


def test_serve_answers_the_chat_as_the_offline_engine(sft_run):
    import openai

    from dsv2.align.conversations import generation_prompt_ids
    from dsv2.engine import LLM
    from dsv2.serve.launch import ServerThread, build_server
    hf = sft_run / "hf"
    messages = CHATS[1][:2]
    llm = LLM(str(hf))
    offline = llm.generate([generation_prompt_ids(llm.tokenizer, messages)], max_new_tokens=12, ignore_eos=True)[0]
    app = build_server(hf, slots=2, max_len=128, max_queue=2, api_key="k", compile=False)
    with ServerThread(app) as srv:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="k", max_retries=0, timeout=60)
        r = client.chat.completions.create(model="hf", messages=messages, max_tokens=12, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert r.usage.prompt_tokens == offline.prompt_tokens
    assert r.choices[0].message.content == offline.text


def test_resume_is_exact(sft_base, chat_files, tmp_path):
    check_exact_resume(lambda out: SFTTrainer(load_sft_config("demo", overrides(sft_base, chat_files, out, export=False)),
                                              print_fn=lambda *_: None), tmp_path)


def test_the_loss_is_normalised_by_the_supervised_tokens_of_the_whole_step(sft_base, chat_files, tmp_path):
    """Two micro-batches of 2 rows and four of 1 are the same step: same loss, same update (the
    micro-batches are cut to different lengths, so this also checks that padding counts nowhere,
    balance losses included)."""
    def one_step(mb):
        cfg = load_sft_config("demo", overrides(sft_base, chat_files, tmp_path / f"mb{mb}", export=False,
                                                **{"batch.micro_batch": mb}))
        tr = SFTTrainer(cfg, print_fn=lambda *_: None)
        out = tr.train_step(0)
        return out, tr.model.state_dict()
    (a, sa), (b, sb) = one_step(2), one_step(1)
    assert a["targets"] == b["targets"] > 0
    assert abs(a["lm_loss"] - b["lm_loss"]) < 1e-6 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-5
    assert all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa)


def test_bad_settings_are_one_sentence(sft_base, chat_files, tmp_path, capsys):
    assert main(["sft", "--config", "demo", "init_from=", f"data.train={chat_files / 'train.jsonl'}"]) == 2
    assert "sft needs the checkpoint to start from: add init_from=PATH" in capsys.readouterr().err
    assert main(["sft", "--config", "demo", f"init_from={sft_base}", "data.overlong=cut"]) == 2
    assert "'data.overlong' is invalid" in capsys.readouterr().err
    assert main(["sft", "--config", "demo", f"init_from={sft_base}", f"data.train={tmp_path / 'none.jsonl'}",
                 f"out_dir={tmp_path / 'o'}"]) == 2
    assert "no conversation file at" in capsys.readouterr().err


def test_the_sft_demo_stage_runs(tmp_path, capsys):
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    assert main(["demo", "--fast", "--stage", "sft", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "training it first" in out and "[sft 4/4]" in out and "held-out exact match:" in out
    assert (tmp_path / "sft" / "hf" / "tokenizer_config.json").exists()


def test_sft_presets_load_and_the_paper_preset_has_its_settings():
    from dsv2.config import ConfigError
    from dsv2.train.config import list_pretrain_presets
    from dsv2.align.sft import SFT_PRESETS
    assert {"deepseek-v2", "demo"} <= set(list_pretrain_presets(SFT_PRESETS))
    for name in list_pretrain_presets(SFT_PRESETS):
        cfg = load_sft_config(name)
        assert cfg.moe.drop_tokens is False and cfg.data.packing
    paper = load_sft_config("deepseek-v2")
    assert paper.optim.lr == 5e-6 and paper.epochs == 2
    with pytest.raises(ConfigError, match="unknown training config key 'data.dir'"):
        load_sft_config("deepseek-v2", ["data.dir=x"])
    with pytest.raises(ConfigError, match="leave the 'model' section out"):
        load_sft_config("deepseek-v2", ["model.hidden_size=8"])
