# make test         set up .venv (pinned dev set + editable install), then run the test suite
# make bench        same set-up, then the whole benchmark suite (results, plots in $(BENCH_OUT)/)
# make bench-quick  same set-up, then the headline shapes only (python -m benchmarks --quick)
# Each target does all its own set-up on a fresh machine; the install is redone only when
# requirements-dev.txt, setup.py, pyproject.toml or csrc/ change (a stamp in .venv named after their hash).
# TEST_ARGS / BENCH_ARGS pass extra flags, e.g. make test TEST_ARGS='-m gpu'; TEST_WORKERS sets pytest-xdist's
# process count (2: the CI machine's cores).

PYTHON ?= python3
VENV ?= .venv
BENCH_OUT ?= bench-out
TEST_ARGS ?=
TEST_WORKERS ?= 2
BENCH_ARGS ?=
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat requirements-dev.txt setup.py pyproject.toml csrc/* | sha256sum | cut -c1-16)

.PHONY: test bench bench-quick install

# pytest exits 5 when it ran no test; make fails on it like on any other non-zero status.
test: $(STAMP)
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadgroup $(TEST_ARGS) || { rc=$$?; [ $$rc -ne 5 ] || echo "pytest ran no tests" >&2; exit $$rc; }

bench: $(STAMP)
	$(PY) -m benchmarks --suite all --out $(BENCH_OUT) $(BENCH_ARGS)

bench-quick: $(STAMP)
	$(PY) -m benchmarks --suite all --quick --out $(BENCH_OUT) $(BENCH_ARGS)

install: $(STAMP)

$(STAMP):
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -r requirements-dev.txt
	$(PY) -m pip install --no-build-isolation --no-deps -e .
	rm -f $(VENV)/.installed-*
	touch $@
