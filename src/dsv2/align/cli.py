"""`dsv2 sft`: fine-tune a checkpoint on chat data from a YAML config with dotted overrides.

    dsv2 sft --config demo init_from=runs/demo/pretrain/hf data.train=train.jsonl data.val=val.jsonl
    dsv2 sft --config deepseek-v2 init_from=CKPT data.train=chats.jsonl --resume auto
    dsv2 sft --config deepseek-v2 --print-config
    dsv2 sft --config deepseek-v2 --nproc 4 --ep 2 init_from=CKPT data.train=...   # see dsv2.launch
"""

from __future__ import annotations

from ..launch import add_training_verb


def add_parser(sub) -> None:
    add_training_verb(
        sub, "sft", run, help="supervised fine-tuning on chat data (assistant-only loss, packing)",
        description="Fine-tune init_from on JSONL conversations with the tokenizer's chat template "
                    "(DeepSeek-V2's by default), loss on the assistant's answers only, packed rows, and the "
                    "pretraining loop's optimizer, checkpoints and distribution. Settings come from --config "
                    "(a preset name or a .yaml path) and then KEY=VALUE overrides.",
        config_help="preset name (deepseek-v2, demo) or path to a .yaml", default_config="deepseek-v2",
        example="init_from=CKPT data.train=chats.jsonl optim.lr=1e-5 epochs=1")


def run(args) -> int:
    from ..launch import start
    from .sft import SFTTrainer, load_sft_config
    return start(args, load_sft_config(args.config, args.overrides), SFTTrainer)
