# Two commands do all set-up on a fresh machine: `make run` and `make test`.
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: run test test-all bench install clean

# pyproject.toml asks for torch>=2.4. Left to itself, pip resolves that range to the newest wheel, which on
# Linux is the multi-GB CUDA build (plus its nvidia-* wheels) even on machines without a GPU. So torch is
# installed first, pinned to the CPU build the tests were run with (on the project's machines pip finds that
# exact wheel locally); pip then sees the range satisfied. Elsewhere, point pip at a CPU wheel index with
#   TORCH_PIP_ARGS="--index-url <your CPU wheel index>" make install
TORCH_VERSION  ?= 2.13.0
TORCH_PIP_ARGS ?=

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)" $(TORCH_PIP_ARGS)
	$(PY) -m pip install -q -e ".[all,test]"
	# xgrammar, the second constraint engine, is tested beside llguidance; its wheel declares triton (and would
	# resolve a CUDA torch), which the CPU path never imports, so it goes in without dependencies
	$(PY) -m pip install -q --no-deps "xgrammar==0.2.9" "apache-tvm-ffi" || echo "xgrammar not installed: its tests skip"
	touch $(STAMP)

install: $(STAMP)

run: $(STAMP)
	$(VENV)/bin/lmstack speedrun

test: $(STAMP)
	$(PY) -m pytest -q

test-all: $(STAMP)
	$(PY) -m pytest -q -m ""

bench: $(STAMP)
	@for f in bench/*.py; do echo "== $$f"; $(PY) $$f || exit 1; done

clean:
	rm -rf $(VENV) runs .pytest_cache
