"""`dsv2 pretrain`: train from a YAML config with dotted overrides, on one or many processes.

    dsv2 pretrain --config tiny data.dir=runs/data out_dir=runs/tiny steps=600
    dsv2 pretrain --config my.yaml --resume auto
    dsv2 pretrain --config tiny --print-config
    dsv2 pretrain --config tiny --nproc 4 --ep 2 ...           # distributed: see dsv2.launch

The verb sits above the trainer and the launcher: it parses, resolves the config and hands
both to `dsv2.launch.launch` with the pretraining Trainer.
"""

from __future__ import annotations

from .launch import add_arguments


def add_parser(sub) -> None:
    p = sub.add_parser("pretrain", help="pretrain a DeepSeek-V2 model from token shards",
                       description="Pretrain with AdamW, the paper's LR and batch schedules, balance losses, "
                                   "device-limited routing and token dropping. Settings come from --config "
                                   "(a preset name or a .yaml path) and then from KEY=VALUE overrides.")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                   help="dotted overrides, e.g. steps=200 optim.lr=1e-3 model.num_hidden_layers=2")
    p.add_argument("--config", default="tiny", help="preset name (tiny, small) or path to a .yaml (default tiny)")
    p.add_argument("--resume", default=None, help="'auto' (latest checkpoint in out_dir, if any) or a checkpoint path")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    add_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import yaml

    from .launch import launch
    from .train.config import load_config
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from .train.loop import Trainer
    return launch(args, cfg, Trainer)
