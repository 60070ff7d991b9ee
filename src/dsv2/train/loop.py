"""The pretraining loop: build -> (parallelize) -> optimizer -> steps -> eval -> checkpoints -> export.

    dsv2 pretrain --config tiny data.dir=runs/data out_dir=runs/tiny            # CPU
    dsv2 pretrain --config small device=cuda batch.micro_batch=32                # one GPU
    dsv2 pretrain --config tiny --resume auto                                    # continue the last run

One optimizer step: the batch schedule says how many sequences; they are read as
micro-batches, each forward runs under bf16 autocast (fp32 master weights), its loss is
CE summed over target tokens / the step's number of target tokens (`count_targets`, see
the package docstring) + the balance losses weighted by the micro-batch's share of the
step, and gradients accumulate; then clip to 1.0 and AdamW. Nothing here is distributed:
`parallelize`, `count_targets`, `checkpointer` and `is_main` are the seams.

Other objectives subclass the Trainer and replace what differs, not the loop: the model's
source (`model_config`, `build_model`), the data (`build_data`, `next_micro_batch`,
`val_batches`: any `Batch` of input ids, targets with IGNORE_INDEX where nothing is scored,
and segment ids for packed rows) and the export's tokenizer (`tokenizer_dir`). SFT
(align/sft.py) is such a subclass.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch
import yaml
from torch import nn

from ..checkpoint import save_pretrained
from ..config import ModelConfig
from ..data.loader import Batch, TokenLoader
from ..data.shards import read_card
from ..model import DeepseekV2
from ..dtypes import cpu_has_fast_bf16
from ..native.swap import use_native
from .checkpoint import Checkpointer, LocalCheckpointer, RNGState
from .config import TrainConfig
from .metrics import MetricsWriter, peak_flops, step_line
from .moe_hooks import MoERules
from .optim import build_optimizer, clip_grad_norm_
from .schedule import Schedule


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name} was asked for but this torch sees no CUDA GPU: use device=cpu.")
    return torch.device(name)


def resolve_precision(name: str, device: torch.device) -> str:
    if name != "auto":
        return name
    return "bf16" if device.type == "cuda" or cpu_has_fast_bf16() else "fp32"


def build_model(cfg: ModelConfig, device: torch.device, seed: int) -> DeepseekV2:
    """fp32 parameters drawn with the config's init std, in train mode."""
    torch.manual_seed(seed)
    with torch.device(device):
        model = DeepseekV2(cfg)
    return model.train()


def load_init_from(path: str | Path, cfg: ModelConfig, device: torch.device) -> DeepseekV2:
    """fp32 weights of init_from (an HF folder, or a step_* checkpoint of one process) in a model of
    `cfg` (init_from's config with shape-preserving overrides: its rotary frequencies are cfg's)."""
    from ..checkpoint import load_pretrained
    if device.type == "meta":
        raise ValueError("--meta-init draws fresh weights, but init_from gives them: leave --meta-init out.")
    path = Path(path)
    if (path / "config.json").exists():
        return load_pretrained(path, dtype=torch.float32, device=device, config=cfg).train()
    model = build_model(cfg, device, 0)
    state = torch.load(path / "state.pt", map_location=device, weights_only=True)["model"]
    params = dict(model.named_parameters())
    missing = sorted(set(params) - set(state))
    if missing:
        raise ValueError(f"init_from {path}'s state.pt lacks '{missing[0]}' ({len(missing)} weights in all): it is "
                         "not a checkpoint of this architecture.")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[name])
    return model.train()


@dataclass
class TrainState:
    step: int = 0
    tokens: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "tokens": self.tokens}

    def load_state_dict(self, sd: dict) -> None:
        self.step, self.tokens = int(sd["step"]), int(sd["tokens"])


class Trainer:
    def __init__(self, cfg: TrainConfig, parallelize: Callable[[nn.Module], nn.Module] | None = None,
                 checkpointer: Checkpointer | None = None, count_targets: Callable[[int], int] | None = None,
                 is_main: bool = True, dp_rank: int = 0, dp_size: int = 1, grad_scale: float = 1.0,
                 print_fn: Callable[[str], None] = print, clip_grad_norm: Callable | None = None,
                 init_device: torch.device | None = None):
        cfg.validate()
        self.cfg, self.is_main, self.print = cfg, is_main, (print_fn if is_main else (lambda *_: None))
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        self.device = resolve_device(cfg.device)
        self.precision = resolve_precision(cfg.precision, self.device)
        self.out = Path(cfg.out_dir)
        mcfg = self.model_config()
        # init_device="meta" builds without memory; `parallelize` then shards and materialises
        self.model = self.build_model(mcfg, init_device or self.device)
        if self.device.type == "cpu" and not cfg.compile:   # attention, experts, norms, RoPE, combine: native operators
            use_native(self.model)
        self.build_data(dp_rank, dp_size)
        self.rules = MoERules(self.model, cfg.moe, cfg.seed)
        self.step_model = parallelize(self.model) if parallelize else self.model
        if cfg.compile:
            self.step_model = torch.compile(self.step_model)
        self.optimizer = build_optimizer(self.step_model, cfg.optim)
        self.schedule = Schedule(cfg)
        self.count_targets = count_targets or (lambda n: n)
        self.grad_scale = grad_scale
        self.clip_grad_norm = clip_grad_norm or clip_grad_norm_  # distributed: one that spans meshes
        self.state = TrainState()
        self.checkpointer = checkpointer or LocalCheckpointer(self.out / "checkpoints", cfg.keep_last)
        self.peak = peak_flops(self.device, cfg.peak_tflops)
        self.flops_per_token = self.model.flops_per_token(cfg.data.seq_len, training=True)
        self.metrics: MetricsWriter | None = None
        self.last_val: float | None = None

    # ------------------------------------------------ what a subclass replaces
    # The objective's seams: where the model comes from, what a micro-batch is, what the
    # validation set is and which tokenizer goes with the export. Everything else (schedule,
    # accumulation, clipping, MoE rules, checkpoints, metrics, distribution) is shared.
    name = "pretrain"
    baseline_name = "unigram baseline"
    val_name, val_unit, val_key = "val loss", " nats", "val_loss_nats"   # what evaluate() returns, as shown and logged
    result_key = "val_loss"                           # ... and under which key fit() returns its last value
    shown_extra: tuple[str, ...] = ()                 # keys of train_step's "extra" shown in the step line

    def model_config(self) -> ModelConfig:
        return self.cfg.model_config()

    def build_model(self, mcfg: ModelConfig, device: torch.device) -> DeepseekV2:
        if self.cfg.init_from:
            return load_init_from(self.cfg.init_from, mcfg, device)
        return build_model(mcfg, device, self.cfg.seed)

    def build_data(self, dp_rank: int, dp_size: int) -> None:
        """The token shards of `data.dir`: fixed windows, next-token targets."""
        cfg = self.cfg
        self.card = read_card(cfg.data.dir)
        vocab = self.model.config.vocab_size
        if self.card["vocab_size"] > vocab:
            raise ValueError(f"the data in {cfg.data.dir} uses {self.card['vocab_size']} token ids but the model's "
                             f"vocab_size is {vocab}: set model.vocab_size={self.card['vocab_size']} or retokenise.")
        self.train_data = TokenLoader(cfg.data.dir, "train", cfg.data.seq_len, cfg.seed, dp_rank, dp_size)
        self.val_data = TokenLoader(cfg.data.dir, "val", cfg.data.seq_len, cfg.seed)
        self.baseline = self.card.get("unigram_val_loss")   # the val loss to beat, printed beside ours
        tok = self.card.get("tokenizer")
        self.tokenizer_dir = tok if tok and Path(tok, "tokenizer.json").exists() else None

    def val_extra(self) -> dict:
        """Further held-out scalars of the last evaluate(), written beside it in the val record."""
        return {}

    def next_micro_batch(self, n: int) -> tuple[Batch, torch.Tensor]:
        """n rows of training data and a unique sample id per row (token dropping protects by id)."""
        tokens, ids = self.train_data.next_batch(n)
        return self.window_batch(tokens), ids

    def val_batches(self) -> Iterator[Batch]:
        for tokens in self.val_data.fixed_batches(self.cfg.data.val_batches, self.cfg.batch.micro_batch):
            yield self.window_batch(tokens)

    def window_batch(self, tokens: torch.Tensor) -> Batch:
        """Windows [n, seq_len + 1] of the token stream -> inputs and next-token targets. With
        data.document_mask each document (from its BOS) attends only within itself and its positions
        restart at 0, as SFT's packed rows do (model/mask.py); otherwise the window is one sequence."""
        x, y = tokens[:, :-1], tokens[:, 1:]
        if not self.cfg.data.document_mask:
            return Batch(x, y)
        return Batch(x, y, torch.cumsum(x == self.card["bos_id"], dim=1))

    # ------------------------------------------------------------------ state
    def stateful(self) -> dict:
        return {"model": self.model, "optim": self.optimizer, "trainer": self.state,
                "data": self.train_data, "rng": RNGState()}

    def resume(self, where: str | None) -> bool:
        """where: None (fresh), "auto" (latest checkpoint if any) or a checkpoint path."""
        if not where:
            return False
        path = self.checkpointer.latest() if where == "auto" else Path(where)
        if path is None:
            self.print(f"resume auto: no checkpoint under {self.out / 'checkpoints'}, starting fresh")
            return False
        self.checkpointer.load(path, self.stateful())
        self.print(f"resumed from {path} at step {self.state.step}")
        return True

    def save(self) -> Path:
        meta = {"tokens": self.state.tokens, "config": self.cfg.to_dict()}
        return self.checkpointer.save(self.state.step, self.stateful(), meta)

    # ------------------------------------------------------------------- step
    def autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.precision == "bf16")

    def train_step(self, step: int) -> dict:
        """One optimizer step at schedule position `step`; returns its scalars.

        The step's micro-batches are read first so the loss can be normalised by the number of
        target tokens of the whole (global) step: with SFT's masked targets that number is
        only known once every micro-batch is in hand."""
        mb = self.cfg.batch.micro_batch
        n_seq = self.schedule.seqs[step]
        lr = self.set_lr(step)
        batches = [self.next_micro_batch(mb) for _ in range(n_seq // mb)]
        n_targets = self.count_targets(sum(b.n_targets for b, _ in batches))
        n_rows = self.count_targets(n_seq)
        lm_sum, aux_sum = 0.0, {}
        for batch, ids in batches:
            batch = batch.to(self.device)
            self.rules.begin(ids)
            with self.autocast():
                # summed over target tokens, without materialising the logits
                ce = self.step_model(batch.input_ids, targets=batch.targets, segment_ids=batch.segment_ids,
                                     moe_hooks=self.rules)
            aux = self.rules.collect(*batch.input_ids.shape, valid_BT=batch.valid)
            # balance losses are means over rows, weighted by this micro-batch's share of the step's rows
            loss = ce / max(1, n_targets) + sum(aux.values()) * (mb / n_rows)
            (loss * self.grad_scale).backward()
            lm_sum += ce.detach()
            for k, v in aux.items():
                aux_sum[k] = aux_sum.get(k, 0.0) + v.detach() * (mb / n_seq)
        grad_norm = self.optimizer_step()
        return {"lm_loss": float(lm_sum) / max(1, n_targets), "lr": lr, "grad_norm": grad_norm,
                "aux": self.per_layer(aux_sum),
                "tokens": sum(b.n_tokens for b, _ in batches), "targets": sum(b.n_targets for b, _ in batches)}

    def set_lr(self, step: int) -> float:
        lr = self.schedule.lr(step)
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        return lr

    def optimizer_step(self) -> float:
        """Clip the accumulated gradients, step, clear them; -> the gradient norm before clipping."""
        grad_norm = self.clip_grad_norm(self.step_model.parameters(), self.cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return float(grad_norm)

    def per_layer(self, aux_sum: dict) -> dict[str, float]:
        """Balance losses summed over MoE layers -> their mean per layer (what the step line shows)."""
        n_layers = max(1, len(self.rules.layers))
        return {k: float(v) / n_layers for k, v in aux_sum.items()}

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean cross-entropy (nats) per target token over the fixed validation set; no dropping."""
        self.step_model.eval()
        total, count = 0.0, 0
        for batch in self.val_batches():
            batch = batch.to(self.device)
            with self.autocast():
                total += float(self.step_model(batch.input_ids, targets=batch.targets, segment_ids=batch.segment_ids))
            count += batch.n_targets
        self.step_model.train()
        return total / max(1, count)

    # -------------------------------------------------------------------- fit
    def fit(self, resume: str | None = None) -> dict:
        cfg = self.cfg
        resumed = self.resume(resume)
        if self.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
            (self.out / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
            self.metrics = MetricsWriter(self.out / "metrics.jsonl", append=resumed)
            if resumed:
                self.metrics.truncate_after(self.state.step)
            self.print(f"{self.name}: {self.model.num_params():,} parameters ({self.model.active_params():,} active), "
                       f"{len(self.schedule)} steps, {self.schedule.total_tokens:,} tokens, device {self.device}, "
                       f"{self.precision}; MoE rules: D={self.rules.D} M={self.rules.M} "
                       f"drop={'on' if self.rules.policy else 'off'} a=({cfg.moe.exp_bal}, {cfg.moe.dev_bal}, "
                       f"{cfg.moe.comm_bal})")
        t_window, tok_window, t_start = time.time(), 0, time.time()
        steps_done_here, window = 0, []
        for step in range(self.state.step, len(self.schedule)):
            out = self.train_step(step)
            window.append(out)
            self.state.step, self.state.tokens = step + 1, self.state.tokens + out["tokens"]
            tok_window += out["tokens"]
            steps_done_here += 1
            done = self.state.step == len(self.schedule)
            if self.state.step % cfg.log_every == 0 or done:
                self._log(_mean(window), tok_window, time.time() - t_window, time.time() - t_start, steps_done_here)
                t_window, tok_window, window = time.time(), 0, []
            if self.rules.layers and (self.state.step % cfg.moe.load_every == 0 or done):
                self._log_load()
            if self.state.step % cfg.eval_every == 0 or done:
                self._eval()
            if self.state.step % cfg.save_every == 0 or done:
                self.save()
        if self.last_val is None:  # resumed a run that had already finished
            self._eval()
        result = {"step": self.state.step, "tokens": self.state.tokens, self.result_key: self.last_val,
                  "unigram_val_loss": self.baseline}
        if self.is_main and cfg.export:
            result["export"] = str(self.export())
        if self.metrics:
            self.metrics.close()
        return result

    def _log(self, out, tok_window, dt_window, dt_total, steps_here) -> None:
        tok_s = tok_window / max(dt_window, 1e-9)
        mfu = tok_s * self.flops_per_token / self.peak if self.peak else None
        seqs = self.schedule.seqs   # rows of the steps left, at the rate of this process's rows so far
        done = sum(seqs[self.state.step - steps_here:self.state.step])
        eta = sum(seqs[self.state.step:]) * dt_total / max(1, done)
        drop = self.rules.drop_rate() if self.rules.policy else None
        loss = out["lm_loss"] + sum(out["aux"].values()) * max(1, len(self.rules.layers))
        extra = out.get("extra", {})    # an objective's own scalars (GRPO: rewards, kl, clip ratio, ...)
        shown = {k: extra[k] for k in self.shown_extra if k in extra}
        self.print(step_line(self.state.step, len(self.schedule), out["lm_loss"], {**out["aux"], **shown}, drop,
                             out["lr"], tok_s, mfu, eta))
        if self.metrics:
            self.metrics.write("train", step=self.state.step, tokens=self.state.tokens, loss_nats=loss,
                               lm_loss_nats=out["lm_loss"], **{f"{k}": v for k, v in out["aux"].items()},
                               drop_rate=drop, lr=out["lr"], grad_norm=out["grad_norm"], tokens_per_s=tok_s, mfu=mfu,
                               **extra)

    def _log_load(self) -> None:
        if self.metrics:
            load = self.rules.load_LE.float()
            share = (load / load.sum(-1, keepdim=True).clamp(min=1)).tolist()
            self.metrics.write("load", step=self.state.step, expert_share=share,
                               max_over_mean=float((load.amax(-1) / load.mean(-1).clamp(min=1e-9)).mean()),
                               drop_rate=self.rules.drop_rate() if self.rules.policy else None)
        self.rules.reset_stats()

    def _eval(self) -> None:
        self.last_val = self.evaluate()
        if self.last_val is None:       # no validation data
            return
        self.print(f"step {self.state.step}: {self.val_name} {self.last_val:.4f}{self.val_unit}"
                   + (f" ({self.baseline_name} {self.baseline:.4f})" if self.baseline is not None else "")
                   + "".join(f", {k} {v:.4f}" for k, v in self.val_extra().items()))
        if self.metrics:
            self.metrics.write("val", step=self.state.step, tokens=self.state.tokens, **{self.val_key: self.last_val},
                               **self.val_extra())

    def export(self) -> Path:
        """The final model as a Hugging Face directory with its tokenizer."""
        path = self.out / "hf"
        save_pretrained(self.model, path, tokenizer_dir=self.tokenizer_dir)
        self.print(f"exported {path} (config.json + model.safetensors + tokenizer)")
        return path


def _mean(outs: list[dict]) -> dict:
    """Losses averaged over the steps since the last step line (one step alone is noisy)."""
    n = len(outs)
    last = outs[-1]
    return {**last, "lm_loss": sum(o["lm_loss"] for o in outs) / n,
            "aux": {k: sum(o["aux"][k] for o in outs) / n for k in last["aux"]},
            "extra": {k: sum(o["extra"][k] for o in outs) / n for k in last.get("extra", {})}}

