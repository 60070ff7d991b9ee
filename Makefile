# `make demo` and `make test` each create .venv on first use.
# torch==2.13.0 is installed first so pip takes the CPU build; pyproject only asks torch>=2.6.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: demo demo-sft demo-grpo test install clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q torch==2.13.0
	$(PY) -m pip install -q -e '.[all]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dsv2 demo

# GRPO on a verifiable toy task beside a coin-flip control, one seed (bench/grpo.py; ~4 min after `make demo`)
demo-grpo: $(STAMP)
	test -f runs/demo/pretrain/hf/config.json || $(VENV)/bin/dsv2 demo
	$(PY) bench/grpo.py --seeds 0

# fine-tune the `make demo` model on a generated instruction set (pretrains it first if absent)
demo-sft: $(STAMP)
	$(VENV)/bin/dsv2 demo --stage sft

test: $(STAMP)
	OMP_WAIT_POLICY=PASSIVE $(PY) -m pytest tests

clean:
	rm -rf $(VENV) runs build src/*.egg-info
