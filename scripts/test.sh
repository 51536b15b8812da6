#!/usr/bin/env bash
# Runs every test (unit and integration) against a real PostgreSQL and a real
# Kafka-protocol broker. Usage: ./scripts/test.sh [extra cargo test/nextest args]
#
# Uses an existing database server when TEST_DATABASE_URL (or DATABASE_URL)
# is set, and an existing broker when KAFKA_BROKERS is set; otherwise starts a
# throwaway PostgreSQL cluster and a throwaway Apache Kafka node, and removes
# them afterwards. The chaos tests (tests/tests/chaos.rs) always start their
# own PostgreSQL and Kafka, since they stop, freeze, kill and restart them.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/infra.sh
source scripts/infra.sh

work=$(mktemp -d "${TMPDIR:-/tmp}/saga-test.XXXXXX")
chmod 755 "$work"
cleanup() {
  local rc=$?
  stop_kafka "$work/kafka"
  stop_postgres "$work/pg"
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT INT TERM

if [ -z "${TEST_DATABASE_URL:-}" ] && [ -n "${DATABASE_URL:-}" ]; then
  TEST_DATABASE_URL=$DATABASE_URL
fi
if [ -z "${TEST_DATABASE_URL:-}" ]; then
  pg_port=$(free_port)
  echo "==> starting a throwaway PostgreSQL on 127.0.0.1:$pg_port"
  start_postgres "$work/pg" "$pg_port"
  TEST_DATABASE_URL="postgres://postgres@127.0.0.1:$pg_port/postgres"
else
  echo "==> using the PostgreSQL server at TEST_DATABASE_URL"
fi
export TEST_DATABASE_URL

# The operations test scrapes the services with a real Prometheus.
PROMETHEUS_BIN=${PROMETHEUS_BIN:-$(prometheus_bin)}
export PROMETHEUS_BIN

# The API test renders Swagger UI in a real headless browser; the
# authentication tests make their keys with openssl.
CHROMIUM_BIN=${CHROMIUM_BIN:-$(chromium_bin)}
export CHROMIUM_BIN
need_openssl
# The clock test runs order-service with its host clock set back.
FAKETIME_LIB=${FAKETIME_LIB:-$(faketime_lib)}
export FAKETIME_LIB

# The chaos tests start brokers of their own (to freeze, kill and restart
# them), so Kafka's jars must be here even when KAFKA_BROKERS points at
# another broker: fetched once per machine.
KAFKA_HOME=$(kafka_home)
export KAFKA_HOME

# The trace test sends the services' spans to a real Jaeger v2, built once
# per machine from its Go module (about 10 minutes the first time).
started=$SECONDS
JAEGER_BIN=$(jaeger_bin)
export JAEGER_BIN
[ $((SECONDS - started)) -lt 5 ] || echo "==> Jaeger built in $((SECONDS - started)) s"

if [ -z "${KAFKA_BROKERS:-}" ]; then
  kafka_port=$(free_port)
  echo "==> starting a throwaway Apache Kafka $(kafka_version) on 127.0.0.1:$kafka_port"
  started=$SECONDS
  start_kafka "$work/kafka" "$kafka_port"
  echo "==> Kafka answered after $((SECONDS - started)) s"
  KAFKA_BROKERS="127.0.0.1:$kafka_port"
else
  echo "==> using the Kafka broker(s) at KAFKA_BROKERS=$KAFKA_BROKERS"
fi
export KAFKA_BROKERS
export RUST_LOG=${RUST_LOG:-warn}
# Keep test telemetry local.
unset OTEL_EXPORTER_OTLP_ENDPOINT

# The repository's kafka-topics.sh against the test broker, through Apache
# Kafka's own CLI (its wrappers sit in $KAFKA_HOME/bin).
echo "==> kafka-topics.sh against $KAFKA_BROKERS"
prefix="topics-check-$$-"
BOOTSTRAP_SERVER=$KAFKA_BROKERS TOPIC_PREFIX=$prefix ./kafka-topics.sh >/dev/null
BOOTSTRAP_SERVER=$KAFKA_BROKERS TOPIC_PREFIX=$prefix ./kafka-topics.sh >"$work/topics.txt"
for t in order-events payment-events inventory-events; do
  if ! grep -qx "$prefix$t" "$work/topics.txt" || ! grep -qx "$prefix$t.dlq" "$work/topics.txt"; then
    echo "error: kafka-topics.sh did not create $prefix$t and its .dlq" >&2
    exit 1
  fi
done

echo "==> building ($(disk_free) free)"
cargo build --workspace --all-targets --locked
echo "==> built ($(disk_free) free, target/ holds $(du -sh target 2>/dev/null | cut -f1))"
echo "==> testing"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast "$@"
  # nextest does not run doctests.
  cargo test --workspace --locked --doc
else
  cargo test --workspace --locked --no-fail-fast "$@"
fi
