"""`dsv2 export`: a DCP checkpoint -> Hugging Face directory (kept free of torch imports at the
top: `--help` stays fast). The distributed flags of `dsv2 pretrain` are the launcher's
(`dsv2.launch`).

    dsv2 export runs/x/checkpoints runs/x/hf --dtype bfloat16
"""

from __future__ import annotations

from pathlib import Path

from ..options import add_dtype


def add_parser(sub) -> None:
    """`dsv2 export`: a DCP checkpoint (written by any number of processes) -> Hugging Face directory."""
    p = sub.add_parser("export", help="write a DCP training checkpoint as a Hugging Face directory",
                       description="Read a checkpoint written by `dsv2 pretrain` on any number of processes "
                                   "(a step_* directory, or the checkpoints/ folder for the newest step) and write "
                                   "config.json + safetensors that transformers and `dsv2 generate` load. "
                                   "Runs in one process.")
    p.add_argument("checkpoint", help="runs/x/checkpoints/step_00000100 or runs/x/checkpoints")
    p.add_argument("out", help="output directory")
    add_dtype(p, meaning="float32, as trained")
    p.add_argument("--tokenizer", default=None, help="tokenizer directory to copy (default: the training data's)")
    p.set_defaults(func=_export)


def _export(args) -> int:
    import json

    from ..dtypes import parse_dtype
    from ..train.config import from_dict
    from .checkpoint import DCPCheckpointer, export_hf
    path = Path(args.checkpoint)
    if not (path / ".metadata").exists():
        path = DCPCheckpointer(path).latest()
        if path is None:
            raise FileNotFoundError(f"no DCP checkpoint (step_*/.metadata) at or under {args.checkpoint}.")
    meta = json.loads((path / "state.json").read_text()).get("meta", {})
    if "config" not in meta:
        raise ValueError(f"{path}/state.json has no training config: it was not written by `dsv2 pretrain`.")
    cfg = from_dict(meta["config"])
    tok = args.tokenizer
    if tok is None:
        card = Path(cfg.data.dir) / "card.json"
        tok = json.loads(card.read_text()).get("tokenizer") if card.exists() else None
    tok = tok if tok and (Path(tok) / "tokenizer.json").exists() else None
    out = export_hf(path, cfg.model_config(), args.out, parse_dtype(args.dtype), tok)
    print(f"wrote {out} from {path}" + (f" with the tokenizer of {tok}" if tok else ""))
    return 0
