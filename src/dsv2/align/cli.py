"""`dsv2 sft` and `dsv2 grpo`: fine-tune a checkpoint on chats, then with RL; YAML config + dotted overrides.

    dsv2 sft --config demo init_from=runs/demo/pretrain/hf data.train=train.jsonl data.val=val.jsonl
    dsv2 sft --config deepseek-v2 init_from=CKPT data.train=chats.jsonl --resume auto
    dsv2 sft --config deepseek-v2 --print-config
    dsv2 sft --config deepseek-v2 --nproc 4 --ep 2 init_from=CKPT data.train=...   # see dsv2.launch
    dsv2 grpo --config deepseek-v2 init_from=runs/sft/hf data.train=prompts.jsonl data.val=held_out.jsonl
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
    add_training_verb(
        sub, "grpo", run_grpo, help="reinforcement learning with GRPO (group-relative advantages, k3 KL)",
        description="Sample G completions per prompt from the live policy with dsv2's engine, reward them "
                    "(exact match, regex, code tests, reward models or module:function), and optimise the clipped "
                    "GRPO objective minus beta x KL to a frozen reference. Settings come from --config and then "
                    "KEY=VALUE overrides.",
        config_help="preset name (deepseek-v2, demo) or path to a .yaml", default_config="deepseek-v2",
        example="init_from=CKPT data.train=prompts.jsonl grpo.group_size=16 grpo.beta=0")
    rm = sub.add_parser("rm", help="reward models: `dsv2 rm train` (a scalar head, Bradley-Terry on preference pairs)",
                        description="Reward models for GRPO (grpo.rewards: {rm:PATH: weight}).")
    add_training_verb(
        rm.add_subparsers(dest="rm_verb", metavar="VERB", required=True), "train", run_rm,
        help="train a reward model on chosen/rejected pairs",
        description="Put a scalar head on init_from's backbone and train it with the pairwise (Bradley-Terry) "
                    "loss on JSONL preference pairs; exported as DeepseekV2ForSequenceClassification (num_labels 1).",
        config_help="preset name (demo) or path to a .yaml", default_config="demo",
        example="init_from=CKPT data.train=pairs.jsonl data.val=held_out.jsonl steps=200")


def run(args) -> int:
    from ..launch import start
    from .sft import SFTTrainer, load_sft_config
    return start(args, load_sft_config(args.config, args.overrides), SFTTrainer)


def run_grpo(args) -> int:
    from ..launch import start
    from .grpo_trainer import GRPOTrainer, load_grpo_config
    return start(args, load_grpo_config(args.config, args.overrides), GRPOTrainer)


def run_rm(args) -> int:
    from ..launch import start
    from .reward_model import RMTrainer, load_rm_config
    return start(args, load_rm_config(args.config, args.overrides), RMTrainer)
