"""Pretraining DeepSeek-V2 the paper's way, on one process; the seams for scaling out are fixed here.

Files, in the order a step flows through them:
    config.py      TrainConfig dataclasses; YAML presets (presets/pretrain/*.yaml) + dotted overrides
    schedule.py    the paper's LR schedule (warmup, x0.316 steps at fractions of tokens), batch-size ramp
    optim.py       AdamW with weight decay on matrices only
    routing.py     device-limited routing rules: expert -> group map, groups touched per token
    balance.py     L_ExpBal, L_DevBal, L_CommBal per sequence, from routing + expert->group map
    dropping.py    device-level capacity token dropping (lowest affinity first, protected sequences)
    moe_hooks.py   installs dropping / routing capture on every MoE layer, collects losses and loads
    checkpoint.py  Checkpointer protocol + LocalCheckpointer (atomic, keep last k, `--resume auto`)
    metrics.py     JSONL metrics and the one-line step report
    loop.py        Trainer: build -> (parallelize) -> optimizer -> steps -> eval -> checkpoints -> export
    plot.py        `dsv2 plot RUN_DIR`: PNGs from metrics.jsonl

Contract with distributed training (distributed/), which wraps this trainer and must not need
to edit its loop. The loop itself contains no torch.distributed code.

1. Building the model. `Trainer(cfg, parallelize=fn, ...)` builds the model with
   `build_model(cfg)` (fp32 parameters, init std from the model config, on the run's device),
   installs the MoE training hooks on every `MoE` layer, then calls `fn(model)`. `fn` may
   shard in place (FSDP2 `fully_shard`), swap each `MoE.dispatcher` for an all_to_all one,
   compile, and returns the module to run the step with (the same one or a wrapper). Bind a
   mesh with `functools.partial(parallelize, mesh=mesh, ...)`. The optimizer is built after
   `fn`, from the returned module's parameters. `trainer.model` stays the unwrapped module
   (checkpoints and HF export never see wrapper prefixes); `trainer.step_model` is what runs.

2. Loss normalisation. A step's LM loss is sum(cross-entropy over every target token of all
   micro-batches) / n_targets, where n_targets = `count_targets(local_count)`; the default is
   the identity. A data-parallel run passes `count_targets=lambda n: <all_reduce SUM of n>`
   so each rank divides by the GLOBAL number of target tokens and gradients add up (FSDP2's
   reduce-scatter averages, so pass the world size in `grad_scale` to undo it; see loop.py).
   Balance losses are means over the sequences of a micro-batch, weighted by the
   micro-batch's share of the step's sequences, so they need no global count.

3. MoE rules are pure functions of one layer's routing for a micro-batch, reshaped per
   sequence (scores_BTE float32 softmax, idx_BTK, optionally keep_BTK), and `group_E`, an
   int tensor mapping each routed expert to its group (D groups; `routing.expert_groups`).
   Under expert parallelism a group is the rank holding those experts: pass that mapping
   and the same functions give L_DevBal / L_CommBal / capacity per rank. Dropping is
   `DropPolicy(group_E, n_groups, capacity_factor, protect_fraction)`, a callable the trainer's
   MoERules (moe_hooks.py) hands to each layer's dispatcher, through the `moe_hooks` every
   training forward takes: in one process it sees the local tokens (capacity = factor x
   average group load of this micro-batch); an expert-parallel dispatcher runs it over its
   group's tokens. It is applied before the dispatch, so an all_to_all dispatcher receives
   the already-filtered `keep_NK`.

4. Checkpoints go through the `Checkpointer` protocol (checkpoint.py):
       save(step, state) -> path     latest() -> path | None     load(path, state) -> None
   `state` is a dict of Stateful objects (each has state_dict() / load_state_dict()):
   "model" (trainer.model), "optim" (the optimizer), "trainer" (step, tokens seen, schedule
   position), "data" (the loader's exact position), "rng" (torch / python RNG states).
   This is the shape `torch.distributed.checkpoint.save/load` takes, so a DCP checkpointer
   is a drop-in: `Trainer(cfg, checkpointer=DCPCheckpointer(...))`. `LocalCheckpointer`
   writes one torch.save file into a temporary directory, renames it into place (atomic),
   and keeps the last k. Load fills `state` in place.

5. Ranks. `Trainer(..., is_main=...)` gates printing, metrics and exports; the loader takes
   `dp_rank, dp_size` and gives each data-parallel rank disjoint sequences.
"""
