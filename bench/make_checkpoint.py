"""Write a random checkpoint at a preset's real size (sharded bf16, tokenizer, chat template).

    .venv/bin/python bench/make_checkpoint.py deepseek-v2-lite /data/v2-lite         # 31 GB, a few minutes
    .venv/bin/python bench/make_checkpoint.py deepseek-v2-lite /tmp/lite3 --layers 3 # V2-Lite's widths, 3 layers

What it writes and how is in the docstring of src/dsv2/bench/make_checkpoint.py; this file is its entry point.
"""

import sys

from dsv2.bench.make_checkpoint import main

if __name__ == "__main__":
    sys.exit(main())
