"""Generation benchmark: dsv2's engine beside transformers' DeepseekV2ForCausalLM, same weights, same run.

    .venv/bin/python bench/generate.py                  # small preset: fp32, bf16, int8
    .venv/bin/python bench/generate.py --dtypes float32 --no-peer
    dsv2 bench                                          # the same, installed

What is measured and how is in the docstring of src/dsv2/bench/generate.py; this file is its entry point.
"""

import sys

from dsv2.bench.generate import _args, run

if __name__ == "__main__":
    sys.exit(run(_args()))
