"""Evaluation: perplexity and bits per byte, tasks (multiple choice, generation, rolling
log-likelihood), and an lm-evaluation-harness model. A thin layer over the model and the
engine: scoring runs through engine/score.py's Scorer, generation through dsv2.LLM.

    perplexity.py   sliding-window perplexity, bits per byte, perplexity against context length
    tasks.py        the task format (YAML + JSONL) and few-shot prompts
    builtin.py      generators of the built-in offline tasks (tasks/*.yaml); templates/ for MMLU, GSM8K, C-Eval
    runner.py       tasks through the engine -> metrics, tables, per-document records
    harness.py      `DSV2LM`, lm-evaluation-harness's model "dsv2"
    cli.py          `dsv2 eval perplexity | tasks | harness`
"""
