"""`dsv2 pretrain`: train from a YAML config with dotted overrides.

    dsv2 pretrain --config tiny data.dir=runs/data out_dir=runs/tiny steps=600
    dsv2 pretrain --config my.yaml --resume auto
    dsv2 pretrain --config tiny --print-config
    dsv2 pretrain --config tiny --nproc 4 --ep 2 ...           # distributed: see dsv2.distributed
"""

from __future__ import annotations


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
    from ..distributed.cli import add_arguments as add_distributed_arguments  # --nproc, --ep, ... (issue 5)
    add_distributed_arguments(p)
    p.set_defaults(func=run)


def run(args) -> int:
    import yaml

    from .config import load_config
    cfg = load_config(args.config, args.overrides)
    if args.print_config:
        print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), end="")
        return 0
    from ..distributed import cli as distributed
    if distributed.wanted(args, cfg):  # several processes: torchrun ranks or --nproc N (issue 5)
        return distributed.run(args, cfg)
    from ..distributed import cli as distributed
    if distributed.wanted(args, cfg):  # several processes, expert parallelism, or a DCP checkpoint
        return distributed.run(args, cfg)
    from .loop import Trainer
    result = Trainer(cfg).fit(resume=args.resume)
    print(f"done: step {result['step']}, {result['tokens']:,} tokens, val loss {result['val_loss']:.4f} nats "
          f"(unigram baseline {result['unigram_val_loss']:.4f})")
    return 0
