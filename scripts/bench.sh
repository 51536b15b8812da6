#!/usr/bin/env bash
# Benchmarks the saga on this machine and writes BENCHMARKS.md.
#
# For each scenario, starts a fresh PostgreSQL (durable: fsync and
# synchronous_commit on), Apache Kafka node and the three release binaries on free
# ports, runs the scenario and stops them. The scenarios:
#   1. idle CPU for 10 s (the cost of low fetch.wait.max.ms polling)
#   2. open loop 10 orders/s for 30 s (the unloaded floor, leg by leg)
#   3. open loop 50 orders/s for 30 s
#   4. open loop 200 orders/s for 30 s
#   5. closed loop, concurrency 64 (BENCH_ORDERS orders, default 60000: over
#      30 s at the target of 1,000 sagas/s)
# and records each service's CPU and peak RSS per scenario, with the broker's
# CPU and peak RSS and the whole machine's busy share.
# BENCH_SCENARIOS picks a subset (e.g. "max"); BENCH_OUT another output file.
# BENCH_AUTH=1 runs the services with authentication on (the development key
# set in dev/auth/, a development operator token for the load generator), to
# measure what authentication costs.
# Every scenario ends with `saga-admin audit`: the books must balance.
#
# Existing servers instead of local ones (e.g. Kafka from docker compose):
#   KAFKA_BROKERS=localhost:9092 ./scripts/bench.sh
# uses that broker, each scenario under topics and groups of its own
# (KAFKA_TOPIC_PREFIX bench-<run>-<scenario>.), left there afterwards; and
# BENCH_DATABASE_URL (or DATABASE_URL) a PostgreSQL server, each scenario in
# databases of its own, dropped afterwards. Neither's CPU is measured then.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/infra.sh
source scripts/infra.sh

orders=${BENCH_ORDERS:-60000}
out=${BENCH_OUT:-BENCHMARKS.md}
# Kafka answers a fetch as soon as data arrives: the wait only sets how
# often an idle consumer asks again. The load generator reads it too.
export KAFKA_FETCH_WAIT_MS=${KAFKA_FETCH_WAIT_MS:-100}
ext_kafka=${KAFKA_BROKERS:-}
ext_pg=${BENCH_DATABASE_URL:-${DATABASE_URL:-}}
unset KAFKA_TOPIC_PREFIX
auth=${BENCH_AUTH:-}
if [ "$auth" = 1 ]; then
  export AUTH_JWKS_FILE=$PWD/dev/auth/jwks.json AUTH_ISSUER=saga-dev AUTH_AUDIENCE=saga AUTH_ALLOW_DEV_KEY=true
else
  unset AUTH_JWKS_FILE AUTH_JWKS_URL AUTH_ISSUER AUTH_AUDIENCE AUTH_ALLOW_DEV_KEY
fi
run_id=$(date +%s)
work=$(mktemp -d "${TMPDIR:-/tmp}/saga-bench.XXXXXX")
chmod 755 "$work"
services=(order-service payment-service inventory-service)
declare -A pids
sys=""
broker_pid=""
psql=""
if [ -n "$ext_pg" ]; then
  psql=$(psql_bin)
  [ -n "$psql" ] || echo "warning: no psql here: the bench databases on BENCH_DATABASE_URL stay after the run" >&2
fi

# ext_psql DB SQL: runs SQL in database DB of the external server.
ext_psql() {
  [ -n "$psql" ] && "$psql" "$(url_with_db "$ext_pg" "$1")" -qAtc "$2"
}

# Stops the services, the broker and PostgreSQL of the running system.
stop_system() {
  local s
  for s in "${services[@]}"; do
    if [ -n "${pids[$s]:-}" ]; then kill -TERM "${pids[$s]}" 2>/dev/null || true; fi
  done
  for s in "${services[@]}"; do
    if [ -n "${pids[$s]:-}" ]; then wait "${pids[$s]}" 2>/dev/null || true; fi
    pids[$s]=""
  done
  if [ -n "$sys" ]; then
    stop_kafka "$sys/kafka"
    stop_postgres "$sys/pg"
    if [ -n "$ext_pg" ] && [ -n "$psql" ]; then
      for s in "${services[@]}"; do
        ext_psql postgres "DROP DATABASE IF EXISTS \"$db_prefix${s%-service}\" WITH (FORCE)" >/dev/null ||
          echo "warning: could not drop database $db_prefix${s%-service}" >&2
      done
    fi
  fi
  sys=""
}

cleanup() {
  local rc=$?
  stop_system
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT INT TERM

# start_system NAME: a fresh PostgreSQL (durable), Kafka node and the three
# services on free ports: every scenario starts from empty servers. With
# external servers: fresh databases, topics and groups on them instead.
start_system() {
  local s db p
  sys="$work/$1"
  mkdir -p "$sys"
  chmod 755 "$sys"
  if [ -n "$ext_pg" ]; then
    db_prefix="bench_${run_id}_$1_"
    pg_base=$ext_pg
  else
    db_prefix="bench_"
    pg_port=$(free_port)
    start_postgres "$sys/pg" "$pg_port" durable >/dev/null
    pg_base="postgres://postgres@127.0.0.1:$pg_port/postgres"
  fi
  if [ -n "$ext_kafka" ]; then
    brokers=$ext_kafka
    export KAFKA_TOPIC_PREFIX="bench-$run_id-$1."
  else
    kafka_port=$(free_port)
    start_kafka "$sys/kafka" "$kafka_port"
    broker_pid=$(cat "$sys/kafka/kafka.pid")
    brokers="127.0.0.1:$kafka_port"
  fi
  for s in "${services[@]}"; do
    db=${s%-service}
    p=$(free_port)
    PORT=$p DATABASE_URL="$(url_with_db "$pg_base" "$db_prefix$db")" \
      KAFKA_BROKERS="$brokers" RUST_LOG=${RUST_LOG:-warn} \
      "target/release/$s" >"$sys/$s.log" 2>&1 &
    pids[$s]=$!
    eval "port_${db}=$p"
    for _ in $(seq 1 300); do
      curl -fsS "http://127.0.0.1:$p/ready" >/dev/null 2>&1 && break
      sleep 0.2
    done
    curl -fsS "http://127.0.0.1:$p/ready" >/dev/null || { cat "$sys/$s.log"; exit 1; }
  done
  # Creating the databases left tens of MB to write back; flushed now, it
  # cannot stall the scenario's first commits (seen: 160-190 ms).
  if [ -n "$ext_pg" ]; then
    ext_psql postgres CHECKPOINT >/dev/null 2>&1 || true
  else
    "$(pg_bindir)/psql" -h 127.0.0.1 -p "$pg_port" -U postgres -qAtc CHECKPOINT postgres >/dev/null
  fi
  sync
  # shellcheck disable=SC2154 # set through eval above
  order_url="http://127.0.0.1:$port_order"
  # shellcheck disable=SC2154
  payment_url="http://127.0.0.1:$port_payment"
  # shellcheck disable=SC2154
  inventory_url="http://127.0.0.1:$port_inventory"
}

echo "==> building release binaries"
cargo build --release --locked --bins
if [ "$auth" = 1 ]; then
  echo "==> authentication on: development key set, development operator token"
  SAGA_TOKEN=$(target/release/saga-admin dev-token --sub bench --admin --ttl 12h)
  export SAGA_TOKEN
else
  unset SAGA_TOKEN
fi

scenarios=${BENCH_SCENARIOS:-idle rate10 rate50 rate200 max}
ticks=$(getconf CLK_TCK)
# busy and total jiffies of the whole machine
machine_ticks() { awk '/^cpu / {print $2 + $3 + $4 + $7 + $8, $2 + $3 + $4 + $5 + $6 + $7 + $8}' /proc/stat; }
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
peak_rss_mib() { awk '/VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
reset_peak() { echo 5 >"/proc/$1/clear_refs" 2>/dev/null || true; }
# cpu_share BEFORE NOW: percent of one core between the scenario's $start and $end
cpu_share() {
  awk -v a="$1" -v b="$2" -v t="$ticks" -v s="$start" -v e="$end" 'BEGIN {printf "%.0f", 100 * (b - a) / t / (e - s)}'
}

# run_scenario NAME SECONDS-OR-EMPTY LOADGEN-ARGS...
results=()
run_scenario() {
  local name=$1
  shift
  local db_what="PostgreSQL" broker_what="Kafka"
  [ -z "$ext_pg" ] || db_what="databases on BENCH_DATABASE_URL"
  [ -z "$ext_kafka" ] || broker_what="topics on $ext_kafka"
  echo "    fresh system: $db_what, $broker_what, services"
  start_system "$name"
  local before=() start end s i=0 broker_before machine_before
  for s in "${services[@]}"; do
    reset_peak "${pids[$s]}"
    before+=("$(cpu_ticks "${pids[$s]}")")
  done
  if [ -n "$broker_pid" ]; then
    reset_peak "$broker_pid"
    broker_before=$(cpu_ticks "$broker_pid")
  fi
  machine_before=$(machine_ticks)
  start=$(date +%s.%N)
  if [ "$1" = "idle" ]; then
    sleep 10
    echo '{}' >"$work/$name.json"
  else
    target/release/loadgen --order-url "$order_url" --inventory-url "$inventory_url" \
      --brokers "$brokers" --quiet --json "$work/$name.json" "$@"
  fi
  end=$(date +%s.%N)
  # The books must balance after every scenario (SAGA_TOKEN, if set, is the
  # auditor's token too).
  local books
  if ! books=$(target/release/saga-admin audit --order-url "$order_url" --payment-url "$payment_url" \
    --inventory-url "$inventory_url" --pending-older-than 120s 2>&1); then
    echo "$books" | tail -20 >&2
    echo "error: saga-admin audit failed after scenario $name" >&2
    exit 1
  fi
  books=$(echo "$books" | tail -1)
  echo "    audit: $books"
  local usage=""
  for s in "${services[@]}"; do
    usage+="$s $(cpu_share "${before[$i]}" "$(cpu_ticks "${pids[$s]}")")% CPU, peak RSS $(peak_rss_mib "${pids[$s]}") MiB; "
    i=$((i + 1))
  done
  if [ -n "$broker_pid" ]; then
    usage+="broker (Kafka) $(cpu_share "$broker_before" "$(cpu_ticks "$broker_pid")")% CPU, peak RSS $(peak_rss_mib "$broker_pid") MiB; "
  fi
  usage+="machine $(machine_ticks | awk -v before="$machine_before" '{split(before, a, " "); printf "%.0f", 100 * ($1 - a[1]) / ($2 - a[2])}')% busy; "
  results+=("$name|$work/$name.json|$books|$usage")
  echo "    $usage"
  stop_system
}

for scenario in $scenarios; do
  case $scenario in
    idle) echo "==> idle, 10 s"; run_scenario idle idle ;;
    rate10) echo "==> open loop 10/s for 30 s"; run_scenario rate10 --rate 10/s --duration 30s --hops ;;
    rate50) echo "==> open loop 50/s for 30 s"; run_scenario rate50 --rate 50/s --duration 30s --hops ;;
    rate200) echo "==> open loop 200/s for 30 s"; run_scenario rate200 --rate 200/s --duration 30s --hops ;;
    max)
      echo "==> closed loop, concurrency 64, $orders orders"
      run_scenario max --concurrency 64 --orders "$orders" --grace 120s
      ;;
    *) echo "unknown scenario $scenario (idle rate10 rate50 rate200 max)" >&2; exit 2 ;;
  esac
done

if [ -n "$ext_pg" ]; then
  durability=$(ext_psql postgres "SELECT 'fsync ' || current_setting('fsync') || ', synchronous_commit ' || current_setting('synchronous_commit')" 2>/dev/null || echo "settings unknown")
  database="the PostgreSQL server at BENCH_DATABASE_URL ($durability)"
else
  database="PostgreSQL (fsync and synchronous_commit on)"
fi
if [ -n "$ext_kafka" ]; then
  broker="the broker at KAFKA_BROKERS=$ext_kafka"
else
  broker="Apache Kafka $(kafka_version) (one KRaft node)"
fi
command="./scripts/bench.sh"
[ "$auth" = 1 ] && command="BENCH_AUTH=1 $command"
[ -n "$ext_pg" ] && command="BENCH_DATABASE_URL=… $command"
[ -n "$ext_kafka" ] && command="KAFKA_BROKERS=$ext_kafka $command"
if [ "$auth" = 1 ]; then
  access="authentication on (ES256 bearer tokens)"
else
  access="authentication off"
fi
python3 - "$out" "$(nproc)" "$(date -u +%Y-%m-%d)" "$KAFKA_FETCH_WAIT_MS" "${KAFKA_LINGER_MS:-1}" "$database, $broker" "$command" "$access" "${results[@]}" <<'PY'
import json, sys
out, cores, day, fetch_wait, linger, servers, command, access, *rows = sys.argv[1:]
mem_kib = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal:"))
mem_gib = round(mem_kib / 1024 / 1024)
lines = [
    "# Benchmarks",
    "",
    f"Measured {day} on a machine with {cores} cores and {mem_gib} GiB: {servers},",
    f"the three release binaries (RUST_LOG=warn, {access}) and the load generator.",
    f"Each scenario starts on a fresh system. Consumers' `fetch.wait.max.ms` {fetch_wait},",
    f"producers' `linger.ms` {linger}.",
    f"Reproduce with `{command}` (writes this file). What the figures mean,",
    "where the time goes and what was tried: [docs/performance.md](docs/performance.md).",
    "",
    "Every scenario ends with `saga-admin audit` (the *books* column: every order's end",
    "state agrees across the three services, and every SKU's stock adds up).",
    "",
    "| scenario | sagas done | lost | throughput (sagas/s) | HTTP p50 / p99 (ms) | end-to-end p50 / p90 / p99 / max (ms) | books |",
    "|---|---|---|---|---|---|---|",
]
usage = []
for row in rows:
    name, path, books, use = row.split("|", 3)
    r = json.load(open(path))
    usage.append((name, use))
    if not r:
        continue
    done = r["confirmed"] + r["failed_payment_declined"] + r["failed_out_of_stock"]
    h, e = r["http"], r["end_to_end"]
    lines.append(
        f"| {r['mode']} | {done} | {r['lost']} | {r['sagas_per_s']:.1f} | "
        f"{h['p50_ms']:.1f} / {h['p99_ms']:.1f} | "
        f"{e['p50_ms']:.1f} / {e['p90_ms']:.1f} / {e['p99_ms']:.1f} / {e['max_ms']:.1f} | {books} |"
    )
hop_runs = [(r["mode"], r["hops"]) for r in (json.load(open(row.split("|", 3)[1])) for row in rows) if r.get("hops")]
if hop_runs:
    lines += [
        "",
        "Where the time goes: the confirmed orders' path, leg by leg, p50 / p90 (ms), from",
        "each event's `occurred_at` (set by its handler) and Kafka timestamp (set when the",
        "relay sends it; whole milliseconds). *relay sends → handler* legs are the broker's",
        "delivery plus the next consumer's pick-up; the others are the services' own work.",
        "",
        "| leg | " + " | ".join(mode for mode, _ in hop_runs) + " |",
        "|---|" + "---|" * len(hop_runs),
    ]
    for i, leg in enumerate(hop_runs[0][1]):
        cells = [f"{legs[i]['p50_ms']:.1f} / {legs[i]['p90_ms']:.1f}" for _, legs in hop_runs]
        lines.append(f"| {leg['leg']} | " + " | ".join(cells) + " |")
lines += ["", "CPU (share of one core, averaged over the scenario) and peak RSS per service:", ""]
for name, use in usage:
    lines.append(f"- **{name}**: {use.strip().rstrip(';')}")
open(out, "w").write("\n".join(lines) + "\n")
print(open(out).read())
PY
