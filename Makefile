# The operator's entry point. `make help` lists the targets.
SHELL := /bin/bash
.DEFAULT_GOAL := help

SCRIPTS  := infra/scripts
PROFILE  ?= release
CARGO    ?= cargo
CARGO_PROFILE_FLAG := $(if $(filter release,$(PROFILE)),--release,)
export PROFILE
comma := ,

# Test stack endpoints (the e2e harness reads these).
export CHAT_TEST_BROKERS ?= 127.0.0.1:9092
export CHAT_TEST_PG ?= postgres://chat@127.0.0.1:54320/postgres

# The stack `make up` runs: secured by default (the SASL_SSL broker on 127.0.0.1:9094 and the
# TLS-only Postgres on 127.0.0.1:54321, a Kafka user and a Postgres role per process, their
# credentials in env files under $(STATE_DIR)/secure); INSECURE=1 runs the plaintext stack the
# tests use (127.0.0.1:9092 and 54320, no authentication). `make up` records which one it ran;
# down, status, topics, migrate, tail, replay and export follow it unless INSECURE is given.
STATE_DIR    := $(or $(CHAT_STATE_DIR),$(CURDIR)/.local)
SECURE_ENV   := $(STATE_DIR)/secure
UP_MODE_FILE := $(STATE_DIR)/run/up-mode
UP_MODE      := $(if $(filter 1 yes true,$(INSECURE)),insecure,secure)
ifneq ($(INSECURE),)
MODE := $(UP_MODE)
else
MODE := $(if $(filter insecure,$(shell cat '$(UP_MODE_FILE)' 2>/dev/null)),insecure,secure)
endif
# $(call as,ROLE) prefixes a command so that it runs with ROLE's env file on the secured stack.
as = $(if $(filter secure,$(MODE)),$(SCRIPTS)/secure-stack.sh run $(1) ,)

.PHONY: help
help: ## List the targets.
	@if [ -t 1 ] && [ -z "$${NO_COLOR:-}" ]; then on=$$'\033[36m'; off=$$'\033[0m'; else on=; off=; fi; \
	grep -hE '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -v on="$$on" -v off="$$off" 'BEGIN {FS = ":.*## "}; {printf "  %s%-12s%s %s\n", on, $$1, off, $$2}'

.PHONY: deps
deps: ## Install what is missing on this machine (Java, Maven, Postgres, curl, Kafka jars, Rust toolchain parts).
	@$(SCRIPTS)/install-deps.sh
	@command -v curl >/dev/null || { apt-get install -y -q curl >/dev/null 2>&1 || (apt-get update -q >/dev/null && apt-get install -y -q curl >/dev/null); } || { echo "deps: cannot install curl"; exit 1; }
	@command -v cargo >/dev/null || { echo "deps: cargo not found: install Rust with rustup"; exit 1; }
	@rustup component list --installed 2>/dev/null | grep -q rustfmt || rustup component add rustfmt clippy
	@$(SCRIPTS)/install-kafka.sh

.PHONY: stack
stack: deps ## Start Kafka (KRaft, single node) and Postgres (4 shard databases) on loopback.
	@$(SCRIPTS)/kafka.sh start
	@$(SCRIPTS)/postgres.sh start

.PHONY: stack-down
stack-down: ## Stop Kafka and Postgres (data is kept under .local/), and the secured brokers and Postgres servers the tests start.
	@$(SCRIPTS)/kafka.sh stop
	@$(SCRIPTS)/kafka.sh stop --secure
	@$(SCRIPTS)/postgres.sh stop
	@$(SCRIPTS)/postgres.sh stop --secure
	@$(SCRIPTS)/test-secure.sh stop

.PHONY: build
build: ## Build the binaries (PROFILE=release by default; PROFILE=debug is faster to build).
	@$(CARGO) build $(CARGO_PROFILE_FLAG) --bins --quiet || { echo "build: cargo build failed"; exit 1; }

.PHONY: topics
topics: ## Create the topics (inbound, inbound-dlq, presence, outbound-gw1, outbound-gw2) with infra/topics.json settings (as the Kafka admin on the secured stack).
	@$(call as,admin)target/$(PROFILE)/chatctl topics --gateways gw1,gw2 || { echo "topics: cannot create topics (is Kafka up? make up)"; exit 1; }

.PHONY: migrate
migrate: ## Apply the shard schema migrations (db-writer migrate; as chat_owner on the secured stack).
	@$(call as,owner)target/$(PROFILE)/db-writer migrate || { echo "migrate: cannot migrate the shards (is Postgres up? make up)"; exit 1; }

.PHONY: up-stack
up-stack: ## Start the broker and Postgres `make up` uses (secured; INSECURE=1: make stack's), with users, ACLs, roles and env files.
	@if [ $(MODE) = secure ]; then $(SCRIPTS)/secure-stack.sh start; else $(SCRIPTS)/kafka.sh start && $(SCRIPTS)/postgres.sh start; fi

.PHONY: up
up: deps ## Install, build and run everything, secured (INSECURE=1: plaintext): Kafka, Postgres, gateways gw1+gw2, a multiplexer.
	@mkdir -p '$(STATE_DIR)/run' && echo $(UP_MODE) >'$(UP_MODE_FILE)'
	@$(MAKE) --no-print-directory build up-stack topics migrate INSECURE=$(if $(filter insecure,$(UP_MODE)),1,0)
	@$(if $(filter secure,$(UP_MODE)),CHAT_ENV_DIR='$(SECURE_ENV)' ,)$(SCRIPTS)/services.sh start
	@$(SCRIPTS)/services.sh status
	@echo
	@echo "The chat stack is up$(if $(filter secure,$(UP_MODE)),$(comma) secured,$(comma) plaintext (INSECURE=1))."
	@echo "  websocket:  ws://127.0.0.1:8080/ws (gw1)   ws://127.0.0.1:8081/ws (gw2)"
	@echo "  a token:    make token USER=alice   (or: curl -s http://127.0.0.1:8080/dev/token/alice)"
	@echo "  connect:    websocat 'ws://127.0.0.1:8080/ws?format=json&access_token=<token>'"
	@echo "  send:       {\"send\":{\"clientMessageId\":\"m1\",\"recipient\":\"bob\",\"body\":\"hi\"}}"
	@echo "  history:    curl -H \"Authorization: Bearer <token>\" http://127.0.0.1:8080/messages/bob"
	@echo "  metrics:    http://127.0.0.1:9100/metrics (gw1)  http://127.0.0.1:9101/metrics (gw2)  http://127.0.0.1:9300/metrics"
ifeq ($(UP_MODE),secure)
	@echo "  kafka:      SASL_SSL 127.0.0.1:9094, CA $(STATE_DIR)/kafka-secure/tls/ca.crt"
	@echo "  postgres:   TLS 127.0.0.1:54321, CA $(STATE_DIR)/pg-secure-tls/ca.crt"
	@echo "  creds:      one env file per role in $(SECURE_ENV)/ (mode 600; README.md says how to use them)"
endif
	@echo "  logs:       make logs        stop: make down"

.PHONY: down
down: ## Stop everything `make up` started (the stack it last ran; INSECURE=1 or 0 to say which).
	@$(SCRIPTS)/services.sh stop
	@if [ $(MODE) = secure ]; then $(SCRIPTS)/secure-stack.sh stop; else $(SCRIPTS)/kafka.sh stop && $(SCRIPTS)/postgres.sh stop; fi

.PHONY: status
status: ## Show what is running; fails when something `make up` starts is down.
	@rc=0; \
	if [ $(MODE) = secure ]; then $(SCRIPTS)/secure-stack.sh status || rc=1; \
	else $(SCRIPTS)/kafka.sh status || rc=1; $(SCRIPTS)/postgres.sh status || rc=1; fi; \
	$(SCRIPTS)/services.sh status || rc=1; \
	if [ $$rc -ne 0 ]; then echo "status: not everything is up (make up starts what is missing)" >&2; fi; \
	exit $$rc

.PHONY: logs
logs: ## Follow the logs of the gateways and the multiplexer (under CHAT_STATE_DIR, default .local); fails when there are none.
	@$(SCRIPTS)/services.sh logs

.PHONY: token
token: ## Print a dev token: make token USER=alice
	@test "$(origin USER)" = "command line" || { echo "token: say whose: make token USER=alice"; exit 1; }
	@$(CARGO) run --quiet $(CARGO_PROFILE_FLAG) --bin chatctl -- token "$(USER)"

.PHONY: tail
tail: ## Print a topic as JSON lines (as the data team's read-only Kafka user on the secured stack): make tail TOPIC=inbound [FROM=beginning|end|ms:N|<RFC 3339>] [ARGS="--user alice -f"]
	@test -n "$(TOPIC)" || { echo "tail: say which topic: make tail TOPIC=inbound (or presence, outbound-gw1)"; exit 1; }
	@$(call as,data)target/$(PROFILE)/chatctl tail "$(TOPIC)" --from "$(or $(FROM),beginning)" $(ARGS) || { echo "tail: cannot read $(TOPIC) (is Kafka up and the binary built? make up)"; exit 1; }

.PHONY: replay
replay: ## Rebuild the shards in SHARD_DSNS from inbound (as the data user and chat_owner on the secured stack): make replay [FROM=beginning|offset:N|ms:N|<RFC 3339>]
	@$(call as,replay)target/$(PROFILE)/db-writer replay --from "$(or $(FROM),beginning)" $(if $(filter secure,$(MODE)),--group "data-replay-$$(date +%s)",) || { echo "replay: failed (see the message above; a replay is idempotent and can be run again)"; exit 1; }

.PHONY: export
export: ## Export messages as JSON lines or Parquet (as chat_reader on the secured stack): make export SINCE=2026-11-01T00:00:00Z [OUT=messages.jsonl] [FORMAT=parquet] [CURSOR=export.cursor] (keep mode; docs/data.md)
	@test -n "$(SINCE)$(CURSOR)" || { echo "export: say from when (SINCE=2026-11-01T00:00:00Z) or resume a cursor (CURSOR=export.cursor)"; exit 1; }
	@$(call as,data)target/$(PROFILE)/db-writer export $(if $(SINCE),--since "$(SINCE)",) $(if $(FORMAT),--format "$(FORMAT)",) $(if $(CURSOR),--cursor "$(CURSOR)",) $(if $(OUT),--out "$(OUT)",) || { echo "export: failed (see the message above)"; exit 1; }

.PHONY: tf-fmt
tf-fmt: ## Format the Terraform files (needs the terraform binary).
	@command -v terraform >/dev/null || { echo "tf-fmt: terraform is not installed (the offline HCL checks run in make test-infra)"; exit 1; }
	@terraform fmt -recursive infra/terraform

.PHONY: tf-plan
tf-plan: ## Plan the cloud deployment (needs terraform and cloud credentials; see infra/terraform/README.md).
	@command -v terraform >/dev/null || { echo "tf-plan: terraform is not installed"; exit 1; }
	@cd infra/terraform/deploy && terraform init -input=false >/dev/null && terraform plan -input=false || { echo "tf-plan: plan failed (credentials and network access to the cloud are required)"; exit 1; }

.PHONY: fmt
fmt: ## Format the code.
	@$(CARGO) fmt --all

.PHONY: lint
lint: ## cargo fmt --check and clippy -D warnings.
	@$(CARGO) fmt --all -- --check || { echo "lint: code is not formatted (run make fmt)"; exit 1; }
	@$(CARGO) clippy --workspace --all-targets --quiet -- -D warnings || { echo "lint: clippy found problems"; exit 1; }

.PHONY: test
test: stack lint test-infra ## fmt + clippy, unit tests, integration tests on a real secured Kafka and Postgres (SASL_SSL, TLS verify-full; started if needed), infra checks.
	@$(CARGO) build --bins --quiet || { echo "test: cargo build failed"; exit 1; }
	@$(CARGO) test --workspace --exclude chat-e2e --quiet || { echo "test: tests failed"; exit 1; }
	@$(SCRIPTS)/test-secure.sh --quiet || { echo "test: integration tests failed"; exit 1; }

.PHONY: test-web
test-web: stack ## Web client: unit tests and a real-browser test (Chromium + Playwright) in both retention modes.
	@$(CARGO) build --bins --quiet || { echo "test-web: cargo build failed"; exit 1; }
	@web/tests/install.sh || { echo "test-web: cannot install Chromium or the npm packages"; exit 1; }
	@cd web && npm test || { echo "test-web: web client tests failed (screenshots and logs in web/test-artifacts/)"; exit 1; }

.PHONY: chaos
chaos: deps ## Fault-injection suite, all 9 scenarios (~30 min): 3 brokers, 2 Postgres servers, 2 gateways, 2 multiplexers; writes chaos/RESULTS.md.
	@$(CARGO) build $(CARGO_PROFILE_FLAG) --bins --quiet || { echo "chaos: cargo build failed"; exit 1; }
	@target/$(PROFILE)/chaos --bin-dir target/$(PROFILE) --duration $(or $(DURATION),120) --rate $(or $(RATE),200) || { echo "chaos: anomalies found or a scenario did not complete (see the table above)"; exit 1; }

.PHONY: chaos-short
chaos-short: deps ## Three fault scenarios, 30 s each (CI): a multiplexer SIGKILLed 3 times, a gateway SIGKILLed, bad records in inbound while a multiplexer is SIGKILLed.
	@$(CARGO) build --bins --quiet || { echo "chaos-short: cargo build failed"; exit 1; }
	@target/debug/chaos --bin-dir target/debug --duration 30 --rate 100 --scenarios kill-multiplexer,kill-gateway,poison-record --out target/chaos-short.md || { echo "chaos-short: anomalies found (see the table above)"; exit 1; }

.PHONY: bench
bench: stack ## Benchmark (not in make test): baselines, e2e max rate and latency (keep and delete-on-ack), idle connections, connect storm, what TLS costs (BENCH_STAGES=tls alone); ~40 min; writes bench/RESULTS.md.
	@bench/bench.sh || { echo "bench: failed (see the messages above; outputs in target/bench/)"; exit 1; }

.PHONY: test-infra
test-infra: ## Check Terraform, dashboards and alert rules offline (parses HCL; topics agree with infra/topics.json).
	@infra/tests/run.sh || { echo "test-infra: infrastructure checks failed"; exit 1; }

.PHONY: clean
clean: ## Stop everything and delete local state (.local/) and build output.
	-@$(MAKE) --no-print-directory down
	-@$(MAKE) --no-print-directory stack-down
	@rm -rf .local target
