# Fresh machine: `make demo` (main job) and `make test`. Both create .venv with the system
# python3 if missing, install the CPU torch wheel first (so pip never pulls a CUDA torch),
# then `pip install -e '.[test]'` (re-run only when pyproject.toml/setup.py change).
PYTHON ?= python3
VENV   := .venv
VPY    := $(VENV)/bin/python
STAMP  := $(VENV)/.megatron_md-installed
TORCH  ?= torch==2.13.0
ARGS   ?=
PYTEST_ARGS ?=

.PHONY: demo demo-torch test venv corpus clean-venv

venv: $(STAMP)

$(VPY):
	$(PYTHON) -m venv $(VENV)

$(STAMP): pyproject.toml setup.py | $(VPY)
	@if $(VPY) -c "import torch" >/dev/null 2>&1; then \
		echo "torch already installed: $$($(VPY) -c 'import torch; print(torch.__version__)')"; \
	else \
		$(VPY) -m pip install '$(TORCH)'; \
	fi
	$(VPY) -m pip install -e '.[test]'
	touch $@

# Main job: corpus + tokenizer + indexed dataset (cached in data/), then examples/pretrain_gpt.py
# on megatron-core (2 gloo ranks, TP=2) with MuonMD and with AdamW, and a loss table.
demo: $(STAMP)
	$(VPY) examples/demo_megatron.py $(ARGS)

# The same comparison on a plain-PyTorch GPT (megatron_md.optim.build_optimizer).
demo-torch: $(STAMP)
	$(VPY) examples/demo_cpu.py $(ARGS)

corpus: $(STAMP)
	$(VPY) tools/get_corpus.py

# Fails on any pytest failure, on exit 5 (nothing collected) and when every test skipped.
test: $(STAMP)
	@report=$$(mktemp "$${TMPDIR:-/tmp}/megatron_md-pytest-XXXXXX.xml"); \
	$(VPY) -m pytest -p no:cacheprovider --junitxml="$$report" $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 0 ]; then $(VPY) tools/check_tests_ran.py "$$report" || rc=1; fi; \
	rm -f "$$report"; exit $$rc

clean-venv:
	rm -rf $(VENV)

# Second tier: tests/megatron and tests/megatron_lm on the newest megatron-core (docs/compatibility.md).
# megatron-core >= 0.17 declares Python >= 3.12 but imports and runs on 3.11 (--ignore-requires-python);
# 0.19 imports triton unconditionally (moe/ops/paged_stash.py): importable without a GPU. Its
# dependencies (torch, numpy, packaging) go first with the normal resolver: with
# --ignore-requires-python pip would pick a numpy that has no 3.11 wheel and try to build it.
LATEST_VENV  := .venv-latest
LATEST_PY    := $(LATEST_VENV)/bin/python
LATEST_STAMP := $(LATEST_VENV)/.megatron_md-latest-installed
MCORE_LATEST ?= megatron-core==0.19.2
TRITON       ?= triton==3.9.0

.PHONY: test-latest
$(LATEST_STAMP): pyproject.toml setup.py
	@test -x $(LATEST_PY) || $(PYTHON) -m venv $(LATEST_VENV)
	@if $(LATEST_PY) -c "import torch" >/dev/null 2>&1; then :; else $(LATEST_PY) -m pip install '$(TORCH)'; fi
	$(LATEST_PY) -m pip install numpy packaging '$(TRITON)'
	$(LATEST_PY) -m pip install --ignore-requires-python --no-deps '$(MCORE_LATEST)'
	$(LATEST_PY) -m pip install --no-deps -e .
	$(LATEST_PY) -m pip install $$($(LATEST_PY) -c 'import re, tomllib; p = tomllib.load(open("pyproject.toml", "rb"))["project"]; \
		print(" ".join([d for d in p["dependencies"] if re.split("[<>=!~ ]", d)[0] not in ("torch", "megatron-core")] \
		               + p["optional-dependencies"]["test"]))')
	touch $@

test-latest: $(LATEST_STAMP)
	@report=$$(mktemp "$${TMPDIR:-/tmp}/megatron_md-pytest-XXXXXX.xml"); \
	$(LATEST_PY) -m pytest -p no:cacheprovider --junitxml="$$report" tests/megatron tests/megatron_lm $(PYTEST_ARGS); rc=$$?; \
	if [ $$rc -eq 0 ]; then $(LATEST_PY) tools/check_tests_ran.py "$$report" || rc=1; fi; \
	rm -f "$$report"; exit $$rc
