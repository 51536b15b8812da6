#!/usr/bin/env bash
# Runs the whole system on this machine without Docker:
#   ./scripts/dev.sh up       PostgreSQL + Apache Kafka + the three services (release builds)
#   ./scripts/dev.sh down     stop everything (services get SIGTERM and drain)
#   ./scripts/dev.sh status   what is running
#   ./scripts/dev.sh logs [order-service|payment-service|inventory-service|postgres|kafka]
#
# Same configuration names as docker-compose.yml. Optional:
#   DEV_PG_PORT (5432), DEV_KAFKA_PORT (9092): ports for the local PostgreSQL and broker
#   KAFKA_BROKERS: use this broker instead of starting Apache Kafka
# Kafka keeps its log (topics, consumer-group offsets) in .dev/kafka and
# PostgreSQL its data in .dev/pg, so `down` then `up` resumes the orders in
# flight. Kafka runs on Java (17 or newer): its jars come from Maven Central
# once per machine (scripts/infra.sh, kafka_home), and its CLI wrappers
# (kafka-topics.sh, kafka-console-consumer.sh, kafka-consumer-groups.sh)
# sit beside them; `up` prints where. Each service joins its group as a
# static member (KAFKA_GROUP_INSTANCE_ID=dev-<service>; the prefix is
# KAFKA_GROUP_INSTANCE_ID_PREFIX, for two checkouts on one broker), so a
# service restarted within its session timeout takes its partitions back
# without a rebalance.
#   PAYMENT_LIMIT, PAYMENT_FAILURE_RATE, KAFKA_FETCH_WAIT_MS, RUST_LOG, LOG_FORMAT,
#   OTEL_EXPORTER_OTLP_ENDPOINT, AUTH_JWKS_URL, AUTH_JWKS_FILE, AUTH_ISSUER,
#   AUTH_AUDIENCE: passed to the services
#   DEV_AUTH=1: authentication on with the DEVELOPMENT key set
#   (dev/auth/jwks.json, issuer saga-dev, audience saga; never in production);
#   mint tokens with `cargo run -p saga-admin -- dev-token --sub c-42 [--admin]`
# State (database files, logs, pids) lives in .dev/.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/infra.sh
source scripts/infra.sh

state=$PWD/.dev
pg_port=${DEV_PG_PORT:-5432}
kafka_port=${DEV_KAFKA_PORT:-9092}
services=(order-service payment-service inventory-service)

port_of() {
  case $1 in
    order-service) echo 3000 ;;
    payment-service) echo 3001 ;;
    inventory-service) echo 3002 ;;
  esac
}

db_of() {
  case $1 in
    order-service) echo orders ;;
    payment-service) echo payments ;;
    inventory-service) echo inventory ;;
  esac
}

# Kafka runs on Java: without it, say what to install and stop (no broker
# is started in its place).
need_java() {
  if ! command -v java >/dev/null 2>&1; then
    cat >&2 <<MSG
error: Apache Kafka needs Java 17 or newer, and there is no java here.
Install it (Debian/Ubuntu: sudo apt-get install default-jre-headless maven),
or run everything in containers instead: docker compose up --build
MSG
    exit 1
  fi
  if ! command -v mvn >/dev/null 2>&1 && [ ! -f "${SAGA_KAFKA_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/saga-kafka/$(kafka_version)}/.complete" ]; then
    cat >&2 <<MSG
error: Kafka's jars come from Maven Central through Maven, and there is no mvn here.
Install it (Debian/Ubuntu: sudo apt-get install maven), or use: docker compose up --build
MSG
    exit 1
  fi
}

up() {
  mkdir -p "$state/logs" "$state/pids"
  chmod 755 "$state"
  if [ -f "$state/pg/data/postmaster.pid" ]; then
    echo "PostgreSQL already running"
  else
    echo "==> PostgreSQL on 127.0.0.1:$pg_port (data in .dev/pg, durable commits)"
    start_postgres "$state/pg" "$pg_port" durable
  fi
  if [ -n "${KAFKA_BROKERS:-}" ]; then
    echo "==> using the broker at KAFKA_BROKERS=$KAFKA_BROKERS"
    brokers=$KAFKA_BROKERS
  else
    brokers="127.0.0.1:$kafka_port"
    if [ -f "$state/kafka/kafka.pid" ] && kill -0 "$(cat "$state/kafka/kafka.pid")" 2>/dev/null; then
      echo "Kafka already running"
    else
      need_java
      echo "==> Apache Kafka $(kafka_version) on $brokers (log in .dev/kafka)"
      start_kafka "$state/kafka" "$kafka_port"
    fi
    kafka_bin="$(kafka_home)/bin"
  fi
  if [ -n "${OTEL_EXPORTER_OTLP_ENDPOINT:-}" ]; then
    echo "==> traces go to OTEL_EXPORTER_OTLP_ENDPOINT=$OTEL_EXPORTER_OTLP_ENDPOINT"
  elif [ -f "$state/jaeger/jaeger.pid" ] && kill -0 "$(cat "$state/jaeger/jaeger.pid")" 2>/dev/null; then
    echo "Jaeger already running"
    export OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318
  elif command -v go >/dev/null 2>&1 || [ -n "${JAEGER_BIN:-}" ]; then
    echo "==> Jaeger v2 on http://127.0.0.1:16686 (OTLP on 4317/4318; built once per machine, about 10 minutes)"
    start_jaeger "$state/jaeger" 4317 4318 16686 16685
    export OTEL_EXPORTER_OTLP_ENDPOINT=http://127.0.0.1:4318
  else
    echo "warning: no Go here, so no Jaeger: the services run WITHOUT tracing." >&2
    echo "warning: install Go 1.24+ (Debian: apt-get install golang-go) and run dev.sh up again, or use docker compose up." >&2
  fi
  if [ "${DEV_AUTH:-}" = 1 ]; then
    echo "==> authentication on, with the development key set (dev/auth/jwks.json)"
    # The development key is refused unless this switch says otherwise.
    export AUTH_JWKS_FILE=$PWD/dev/auth/jwks.json AUTH_ISSUER=saga-dev AUTH_AUDIENCE=saga AUTH_ALLOW_DEV_KEY=true
  fi
  echo "==> building release binaries"
  cargo build --release --locked --bins
  for s in "${services[@]}"; do
    if [ -f "$state/pids/$s" ] && kill -0 "$(cat "$state/pids/$s")" 2>/dev/null; then
      echo "$s already running"
      continue
    fi
    PORT=$(port_of "$s") \
      DATABASE_URL="postgres://postgres@127.0.0.1:$pg_port/$(db_of "$s")" \
      KAFKA_BROKERS=$brokers \
      KAFKA_GROUP_INSTANCE_ID=${KAFKA_GROUP_INSTANCE_ID_PREFIX:-dev-}$s \
      RUST_LOG=${RUST_LOG:-info} \
      nohup "target/release/$s" >"$state/logs/$s.log" 2>&1 &
    echo $! >"$state/pids/$s"
  done
  for s in "${services[@]}"; do
    local port waited=0
    port=$(port_of "$s")
    until curl -fsS "http://127.0.0.1:$port/ready" >/dev/null 2>&1; do
      if ! kill -0 "$(cat "$state/pids/$s")" 2>/dev/null; then
        echo "error: $s exited; last log lines:" >&2
        tail -20 "$state/logs/$s.log" >&2
        return 1
      fi
      waited=$((waited + 1))
      if [ "$waited" -gt 300 ]; then
        echo "error: $s not ready after 60s; see .dev/logs/$s.log" >&2
        return 1
      fi
      sleep 0.2
    done
    echo "$s ready on http://127.0.0.1:$port"
  done
  cat <<MSG

Try it:
  curl -sS -X POST localhost:3000/orders -H 'Content-Type: application/json' \\
    -d '{"customer_id":"c-42","items":[{"sku":"SKU-1","quantity":2,"unit_price":"29.99"}]}'
API docs (Swagger UI): http://localhost:3000/docs  http://localhost:3001/docs  http://localhost:3002/docs
Logs: ./scripts/dev.sh logs order-service     Stop: ./scripts/dev.sh down
MSG
  if [ -n "${kafka_bin:-}" ]; then
    cat <<MSG
Kafka's CLI: $kafka_bin (kafka-topics.sh, kafka-console-consumer.sh, kafka-consumer-groups.sh)
  $kafka_bin/kafka-console-consumer.sh --bootstrap-server $brokers --topic order-events \\
    --from-beginning --property print.key=true --property print.headers=true
MSG
  fi
  if [ "${DEV_AUTH:-}" = 1 ]; then
    cat <<MSG
Authentication is on: send a development token (never valid in production):
  TOKEN=\$(cargo run -q -p saga-admin -- dev-token --sub c-42)
  curl -sS localhost:3000/orders -H "Authorization: Bearer \$TOKEN"
MSG
  fi
}

down() {
  for s in "${services[@]}"; do
    stop_pidfile "$state/pids/$s"
  done
  stop_jaeger "$state/jaeger"
  stop_kafka "$state/kafka"
  stop_postgres "$state/pg"
  echo "stopped (the database in .dev/pg and Kafka's topics in .dev/kafka stay; rm -rf .dev to start from scratch)"
}

status() {
  local name pidfile
  for name in "${services[@]}" kafka jaeger; do
    pidfile="$state/pids/$name"
    [ "$name" = kafka ] && pidfile="$state/kafka/kafka.pid"
    [ "$name" = jaeger ] && pidfile="$state/jaeger/jaeger.pid"
    if [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; then
      echo "$name: running (pid $(cat "$pidfile"))"
    else
      echo "$name: stopped"
    fi
  done
  if [ -f "$state/pg/data/postmaster.pid" ]; then echo "postgres: running"; else echo "postgres: stopped"; fi
}

logs() {
  local name=${1:-order-service}
  case $name in
    postgres) tail -f "$state/pg/postgres.log" ;;
    kafka | broker) tail -f "$state/kafka/kafka.log" ;;
    jaeger) tail -f "$state/jaeger/jaeger.log" ;;
    *) tail -f "$state/logs/$name.log" ;;
  esac
}

case ${1:-} in
  up) up ;;
  down) down ;;
  status) status ;;
  logs) logs "${2:-}" ;;
  *)
    echo "usage: $0 up|down|status|logs [service]" >&2
    exit 2
    ;;
esac
