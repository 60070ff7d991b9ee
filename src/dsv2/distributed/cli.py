"""`dsv2 export`: a training checkpoint -> Hugging Face directory (kept free of torch imports at
the top: `--help` stays fast). It reads both kinds `dsv2 pretrain` writes: DCP (torchrun, any
number of processes; step_*/.metadata) and one process's (step_*/state.pt + meta.json). The
distributed flags of `dsv2 pretrain` are the launcher's (`dsv2.launch`).

    dsv2 export runs/x/checkpoints runs/x/hf --dtype bfloat16
"""

from __future__ import annotations

from pathlib import Path

from ..options import add_dtype


def add_parser(sub) -> None:
    """`dsv2 export`: a training checkpoint (one process or any number) -> Hugging Face directory."""
    p = sub.add_parser("export", help="write a training checkpoint as a Hugging Face directory",
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
    from ..train.checkpoint import LocalCheckpointer
    from ..train.config import from_dict
    from .checkpoint import DCPCheckpointer, export_hf
    path = Path(args.checkpoint)
    dcp = (path / ".metadata").exists()
    if not dcp and not (path / "state.pt").exists():
        newest = [c for c in (DCPCheckpointer(path).latest(), LocalCheckpointer(path).latest()) if c is not None]
        if not newest:
            raise FileNotFoundError(f"no training checkpoint (step_*/.metadata or step_*/state.pt) at or under "
                                    f"{args.checkpoint}.")
        path = max(newest, key=lambda d: int(d.name.split("_")[1]))
        dcp = (path / ".metadata").exists()
    written = path / ("state.json" if dcp else "meta.json")
    meta = json.loads(written.read_text())
    meta = meta.get("meta", {}) if dcp else meta
    if "config" not in meta:
        raise ValueError(f"{written} has no training config: it was not written by `dsv2 pretrain`.")
    cfg = from_dict(meta["config"])
    tok = args.tokenizer
    if tok is None:
        card = Path(cfg.data.dir) / "card.json"
        tok = json.loads(card.read_text()).get("tokenizer") if card.exists() else None
    tok = tok if tok and (Path(tok) / "tokenizer.json").exists() else None
    if dcp:
        out = export_hf(path, cfg.model_config(), args.out, parse_dtype(args.dtype), tok)
    else:
        out = _export_local(path, cfg.model_config(), args.out, parse_dtype(args.dtype), tok)
    print(f"wrote {out} from {path}" + (f" with the tokenizer of {tok}" if tok else ""))
    return 0


def _export_local(path: Path, cfg, out, dtype, tokenizer_dir) -> Path:
    """One process's checkpoint (state.pt: model, optimizer, trainer, data, rng) -> HF directory."""
    import torch

    from ..checkpoint import save_pretrained
    from ..model import DeepseekV2
    model = DeepseekV2(cfg)
    model.load_state_dict(torch.load(path / "state.pt", map_location="cpu", weights_only=True)["model"])
    if dtype is not None:
        model.to(dtype)
    save_pretrained(model, out, tokenizer_dir=tokenizer_dir)
    return Path(out)
