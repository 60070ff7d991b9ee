"""`dsv2 pretrain`: train from a YAML config with dotted overrides, on one or many processes.

    dsv2 pretrain --config tiny data.dir=runs/data out_dir=runs/tiny steps=600
    dsv2 pretrain --config my.yaml --resume auto
    dsv2 pretrain --config tiny --print-config
    dsv2 pretrain --config tiny --nproc 4 --ep 2 ...           # distributed: see dsv2.launch

The verb sits above the trainer and the launcher: it parses, resolves the config and hands
both to `dsv2.launch.launch` with the pretraining Trainer.
"""

from __future__ import annotations

from .launch import add_training_verb


def add_parser(sub) -> None:
    add_training_verb(
        sub, "pretrain", run, help="pretrain a DeepSeek-V2 model from token shards",
        description="Pretrain with AdamW, the paper's LR and batch schedules, balance losses, device-limited "
                    "routing and token dropping. Settings come from --config (a preset name or a .yaml path) "
                    "and then from KEY=VALUE overrides.",
        config_help="preset name (tiny, small, demo) or path to a .yaml", default_config="tiny",
        example="steps=200 optim.lr=1e-3 model.num_hidden_layers=2")


def run(args) -> int:
    from .launch import start
    from .train.config import load_config
    from .train.loop import Trainer
    return start(args, load_config(args.config, args.overrides), Trainer)
