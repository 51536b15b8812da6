#!/usr/bin/env bash
# Benchmarks the saga on this machine and writes BENCHMARKS.md.
#
# Starts one Apache Kafka node for the run and warms it up (the floor at
# 200/s for BENCH_WARMUP, default 60s); for each scenario, starts a fresh
# PostgreSQL (durable: fsync and synchronous_commit on) and the three release
# binaries on free ports, under topics and groups of the scenario's own
# (KAFKA_TOPIC_PREFIX bench-<run>-<scenario>.), runs the scenario and stops them. The scenarios:
#   1. idle CPU for 20 s (what the services' polling costs them and the broker)
#   2. open loop 10 orders/s for 30 s (the unloaded floor, leg by leg)
#   3. open loop 50 orders/s for 30 s
#   4. open loop 200 orders/s for 30 s
#   5. closed loop, concurrency 64 (BENCH_ORDERS orders, default 60000: over
#      30 s at the target of 1,000 sagas/s)
# Before each loaded scenario the load generator measures the floor on the
# same broker and database at the scenario's rate (200/s for the closed
# loop), for BENCH_FLOOR_FOR (default 10s): one Kafka hop and one durable
# commit, and a saga's floor of 3 hops + 4 commits. BENCHMARKS.md shows
# each scenario's end-to-end latency beside it.
# and records each service's CPU and peak RSS per scenario, with the broker's
# CPU and peak RSS and the whole machine's busy share.
# BENCH_SCENARIOS picks a subset (e.g. "max"); BENCH_OUT another output file.
# BENCH_REPEAT=N runs each scenario N times in a row, each on a fresh
# system, and adds a table of the spread (median, lowest, highest): on a
# shared machine one run can differ from the next by a third.
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
repeat=${BENCH_REPEAT:-1}
case $repeat in '' | *[!0-9]* | 0) echo "BENCH_REPEAT must be a positive number, not '$repeat'" >&2; exit 2 ;; esac
out=${BENCH_OUT:-BENCHMARKS.md}
# Kafka answers a fetch as soon as data arrives: the wait only sets how
# often an idle consumer asks again. The load generator reads it too.
export KAFKA_FETCH_WAIT_MS=${KAFKA_FETCH_WAIT_MS:-500}
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
  [ -z "$broker_pid" ] || stop_kafka "$work/kafka"
  rm -rf "$work"
  exit "$rc"
}
trap cleanup EXIT INT TERM

# start_system NAME: a fresh PostgreSQL (durable) and the three services on
# free ports, with topics and groups of their own on the run's broker: every
# scenario starts from empty tables and topics. With an external PostgreSQL:
# fresh databases on it instead.
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
  # Topics and groups of the scenario's own on the run's broker.
  export KAFKA_TOPIC_PREFIX="bench-$run_id-$1."
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
if [ -n "$ext_kafka" ]; then
  brokers=$ext_kafka
else
  # One broker for the whole run, warmed up before the first scenario: a
  # fresh JVM spends its first minute or two compiling, which on two cores
  # took a third of a core at 10 orders/s and doubled the 200/s latency.
  # A broker in production is warm.
  kafka_port=$(free_port)
  start_kafka "$work/kafka" "$kafka_port"
  broker_pid=$(cat "$work/kafka/kafka.pid")
  brokers="127.0.0.1:$kafka_port"
fi
warm=""
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
# PostgreSQL's ticks: the postmaster's, its exited children's and its live
# children's (empty with an external server)
pg_ticks() {
  [ -z "$ext_pg" ] && [ -f "$sys/pg/data/postmaster.pid" ] || return 0
  local pm c total
  pm=$(head -1 "$sys/pg/data/postmaster.pid")
  total=$(awk '{print $14 + $15 + $16 + $17}' "/proc/$pm/stat")
  for c in $(pgrep -P "$pm"); do
    total=$((total + $(awk '{print $14 + $15}' "/proc/$c/stat" 2>/dev/null || echo 0)))
  done
  echo "$total"
}
# children_ticks FILE: ticks of this shell's finished children (the load
# generator's, once it ended), from `times` written to FILE by this shell
# itself (a subshell's `times` knows only its own children)
children_ticks() {
  awk -v t="$ticks" 'NR == 2 {
    split($1, u, /[ms]/); split($2, s, /[ms]/)
    printf "%d", (u[1] * 60 + u[2] + s[1] * 60 + s[2]) * t
  }' "$1"
}
peak_rss_mib() { awk '/VmHWM/ {printf "%.1f", $2 / 1024}' "/proc/$1/status"; }
reset_peak() { echo 5 >"/proc/$1/clear_refs" 2>/dev/null || true; }
# cpu_share BEFORE NOW: percent of one core between the scenario's $start and $end
cpu_share() {
  awk -v a="$1" -v b="$2" -v t="$ticks" -v s="$start" -v e="$end" 'BEGIN {printf "%.1f", 100 * (b - a) / t / (e - s)}'
}

# run_scenario NAME SECONDS-OR-EMPTY LOADGEN-ARGS...
results=()
run_scenario() {
  local name=$1
  shift
  local db_what="PostgreSQL" broker_what="new topics on the run's Kafka"
  [ -z "$ext_pg" ] || db_what="databases on BENCH_DATABASE_URL"
  [ -z "$ext_kafka" ] || broker_what="topics on $ext_kafka"
  echo "    fresh system: $db_what, $broker_what, services"
  start_system "$name"
  # The floor first (one Kafka hop, one durable commit at the scenario's
  # rate, on the same broker and database), outside the CPU figures: it
  # also warms the broker's JIT and the connections up (before the idle
  # scenario too, at 10/s, so that idle means idle, not a broker starting).
  if [ -z "$warm" ] && [ -n "$broker_pid" ]; then
    echo "    warming the broker up: the floor at 200/s for ${BENCH_WARMUP:-60s}"
    target/release/loadgen --brokers "$brokers" --quiet --json "$work/warmup.json" \
      --floor "$(url_with_db "$pg_base" "${db_prefix}order")" --floor-for "${BENCH_WARMUP:-60s}" \
      --floor-only --rate 200/s --duration 1s >/dev/null
  fi
  warm=1
  local floor_args=("$@")
  [ "$1" != "idle" ] || floor_args=(--rate 10/s --duration 1s)
  target/release/loadgen --brokers "$brokers" --quiet --json "$work/$name.floor.json" \
    --floor "$(url_with_db "$pg_base" "${db_prefix}order")" --floor-for "${BENCH_FLOOR_FOR:-10s}" \
    --floor-only "${floor_args[@]}" | sed 's/^/    /'
  
  local before=() start end s i=0 broker_before machine_before pg_before
  for s in "${services[@]}"; do
    reset_peak "${pids[$s]}"
    before+=("$(cpu_ticks "${pids[$s]}")")
  done
  if [ -n "$broker_pid" ]; then
    reset_peak "$broker_pid"
    broker_before=$(cpu_ticks "$broker_pid")
  fi
  pg_before=$(pg_ticks)
  machine_before=$(machine_ticks)
  times >"$work/times.before"
  start=$(date +%s.%N)
  if [ "$1" = "idle" ]; then
    sleep 20
    echo '{}' >"$work/$name.json"
  else
    target/release/loadgen --order-url "$order_url" --inventory-url "$inventory_url" \
      --brokers "$brokers" --quiet --json "$work/$name.json" "$@"
  fi
  end=$(date +%s.%N)
  # CPU ticks of each part over the scenario, for CPU time per saga.
  local ticks_used="" j=0
  for s in "${services[@]}"; do
    ticks_used+="$s=$(($(cpu_ticks "${pids[$s]}") - before[j])) "
    j=$((j + 1))
  done
  [ -z "$broker_pid" ] || ticks_used+="Kafka=$(($(cpu_ticks "$broker_pid") - broker_before)) "
  [ -z "$pg_before" ] || ticks_used+="PostgreSQL=$(($(pg_ticks) - pg_before)) "
  times >"$work/times.after"
  ticks_used+="loadgen=$(($(children_ticks "$work/times.after") - $(children_ticks "$work/times.before")))"
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
  results+=("$name|$work/$name.json|$books|$ticks_used|$usage")
  echo "    $usage"
  stop_system
}

for scenario in $scenarios; do
  case $scenario in
    idle | rate10 | rate50 | rate200 | max) ;;
    *) echo "unknown scenario $scenario (idle rate10 rate50 rate200 max)" >&2; exit 2 ;;
  esac
done
for scenario in $scenarios; do
  for k in $(seq 1 "$repeat"); do
    # With repeats, each run of a scenario has a name of its own: max-1, max-2...
    name=$scenario
    again=""
    if [ "$repeat" -gt 1 ]; then
      name="$scenario-$k"
      again=" (run $k of $repeat)"
    fi
    case $scenario in
      idle) echo "==> idle, 20 s$again"; run_scenario "$name" idle ;;
      rate10) echo "==> open loop 10/s for 30 s$again"; run_scenario "$name" --rate 10/s --duration 30s --hops ;;
      rate50) echo "==> open loop 50/s for 30 s$again"; run_scenario "$name" --rate 50/s --duration 30s --hops ;;
      rate200) echo "==> open loop 200/s for 30 s$again"; run_scenario "$name" --rate 200/s --duration 30s --hops ;;
      max)
        echo "==> closed loop, concurrency 64, $orders orders$again"
        run_scenario "$name" --concurrency 64 --orders "$orders" --grace 120s
        ;;
    esac
  done
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
[ "$repeat" -gt 1 ] && command="BENCH_REPEAT=$repeat $command"
[ -n "$ext_pg" ] && command="BENCH_DATABASE_URL=… $command"
[ -n "$ext_kafka" ] && command="KAFKA_BROKERS=$ext_kafka $command"
if [ "$auth" = 1 ]; then
  access="authentication on (ES256 bearer tokens)"
else
  access="authentication off"
fi
python3 - "$out" "$(nproc)" "$(date -u +%Y-%m-%d)" "$KAFKA_FETCH_WAIT_MS" "${KAFKA_LINGER_MS:-0}" "$database, $broker" "$command" "$access" "$ticks" "$repeat" "${results[@]}" <<'PY'
import json, statistics, sys
out, cores, day, fetch_wait, linger, servers, command, access, ticks, repeat, *rows = sys.argv[1:]
repeat = int(repeat)
mem_kib = next(int(l.split()[1]) for l in open("/proc/meminfo") if l.startswith("MemTotal:"))
mem_gib = round(mem_kib / 1024 / 1024)
lines = [
    "# Benchmarks",
    "",
    f"Measured {day} on a machine with {cores} cores and {mem_gib} GiB: {servers},",
    f"the three release binaries (RUST_LOG=warn, {access}) and the load generator.",
    "Each scenario starts on a fresh PostgreSQL with new topics on one broker, warmed up for",
    f"a minute before the first scenario. Consumers' `fetch.wait.max.ms` {fetch_wait},",
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
import os
usage, runs = [], []
for row in rows:
    name, path, books, used, use = row.split("|", 4)
    r = json.load(open(path))
    usage.append((name, use))
    if not r:
        continue
    floor_path = path[: -len(".json")] + ".floor.json"
    if os.path.exists(floor_path):
        r["floor"] = json.load(open(floor_path))["floor"]
    done = r["confirmed"] + r["failed_payment_declined"] + r["failed_out_of_stock"]
    r["cpu_ticks"] = dict(kv.split("=") for kv in used.split())
    r["done"] = done
    r["scenario"] = r["mode"]
    if repeat > 1:
        r["mode"] += f" (run {name.rsplit('-', 1)[1]} of {repeat})"
    runs.append(r)
    h, e = r["http"], r["end_to_end"]
    lines.append(
        f"| {r['mode']} | {done} | {r['lost']} | {r['sagas_per_s']:.1f} | "
        f"{h['p50_ms']:.1f} / {h['p99_ms']:.1f} | "
        f"{e['p50_ms']:.1f} / {e['p90_ms']:.1f} / {e['p99_ms']:.1f} / {e['max_ms']:.1f} | {books} |"
    )
floors = [(r["mode"], r["end_to_end"], r["floor"]) for r in runs if r.get("floor")]
if floors:
    lines += [
        "",
        "The floor: what Kafka and PostgreSQL themselves need, measured by the load generator",
        "just before each scenario on the same broker and database at the scenario's rate",
        "(200/s before the closed loop): one hop (idempotent producer, `acks=all`,",
        "`linger.ms` 0, to a consumer's poll) and one durable commit (an `INSERT` committed",
        "on its own). A confirmed saga needs at least 3 hops and 4 commits; the load",
        "generator sees its end through a fourth hop, which the floor leaves out.",
        "",
        "| scenario | hop p50 / p99 (ms) | commit p50 / p99 (ms) | floor: 3 hops + 4 commits, p50 / p99 (ms) | end-to-end p50 / p99 (ms) | ratio p50 / p99 |",
        "|---|---|---|---|---|---|",
    ]
    for mode, e, f in floors:
        h, c = f["hop"], f["commit"]
        lines.append(
            f"| {mode} | {h['p50_ms']:.2f} / {h['p99_ms']:.2f} | {c['p50_ms']:.2f} / {c['p99_ms']:.2f} | "
            f"{f['saga_p50_ms']:.1f} / {f['saga_p99_ms']:.1f} | {e['p50_ms']:.1f} / {e['p99_ms']:.1f} | "
            f"{e['p50_ms'] / f['saga_p50_ms']:.1f}× / {e['p99_ms'] / f['saga_p99_ms']:.1f}× |"
        )
hop_runs = [(r["mode"], r["hops"], r.get("floor")) for r in runs if r.get("hops")]
if hop_runs:
    lines += [
        "",
        "Where the time goes: the confirmed orders' path, leg by leg, p50 / p90 (ms), from",
        "each event's `occurred_at` (set by its handler) and Kafka timestamp (set when the",
        "relay sends it; whole milliseconds). *relay sends → handler* legs are the broker's",
        "delivery plus the next consumer's pick-up; the others are the services' own work.",
        "",
        "Beside each leg, in brackets, its own floor's p50: a hop for a *relay sends →*",
        "leg, a commit for a service's own leg.",
        "",
        "| leg | " + " | ".join(mode for mode, _, _ in hop_runs) + " |",
        "|---|" + "---|" * len(hop_runs),
    ]
    def leg_floor(leg, floor):
        if not floor:
            return ""
        part = floor["hop"] if leg.startswith("relay sends") else floor["commit"]
        return f" ({part['p50_ms']:.1f})"
    for i, leg in enumerate(hop_runs[0][1]):
        cells = [f"{legs[i]['p50_ms']:.1f} / {legs[i]['p90_ms']:.1f}{leg_floor(legs[i]['leg'], floor)}" for _, legs, floor in hop_runs]
        lines.append(f"| {leg['leg']} | " + " | ".join(cells) + " |")
cpu_runs = [r for r in runs if r["done"]]
if cpu_runs:
    parts = list(cpu_runs[0]["cpu_ticks"])
    lines += [
        "",
        "CPU time per completed saga (ms), over the scenario (the floor before it left out):",
        "each part's CPU divided by the sagas done. PostgreSQL is the server's processes",
        "(with a server of its own); the load generator includes reading the topics back.",
        "",
        "| scenario | " + " | ".join(parts) + " | all |",
        "|---|" + "---|" * (len(parts) + 1),
    ]
    for r in cpu_runs:
        ms = [int(r["cpu_ticks"].get(p, 0)) * 1000 / int(ticks) / r["done"] for p in parts]
        lines.append(f"| {r['mode']} | " + " | ".join(f"{m:.2f}" for m in ms) + f" | {sum(ms):.2f} |")
if repeat > 1 and runs:
    def spread(values, fmt):
        if not values:
            return ""
        return f"{fmt(statistics.median(values))} ({fmt(min(values))}–{fmt(max(values))})"
    def cpu_ms(r):
        return sum(int(t) for t in r["cpu_ticks"].values()) * 1000 / int(ticks) / r["done"]
    lines += [
        "",
        f"The spread over the {repeat} runs of each scenario: median (lowest–highest).",
        "",
        "| scenario | throughput (sagas/s) | end-to-end p50 (ms) | end-to-end p99 (ms) | ratio p50 to the floor | CPU per saga, all parts (ms) |",
        "|---|---|---|---|---|---|",
    ]
    for scenario in dict.fromkeys(r["scenario"] for r in runs):
        same = [r for r in runs if r["scenario"] == scenario]
        f1 = lambda v: f"{v:.1f}"
        ratios = [r["end_to_end"]["p50_ms"] / r["floor"]["saga_p50_ms"] for r in same if r.get("floor")]
        lines.append(
            f"| {scenario} | {spread([r['sagas_per_s'] for r in same], f1)} | "
            f"{spread([r['end_to_end']['p50_ms'] for r in same], f1)} | "
            f"{spread([r['end_to_end']['p99_ms'] for r in same], f1)} | "
            f"{spread(ratios, lambda v: f'{v:.1f}×')} | "
            f"{spread([cpu_ms(r) for r in same if r['done']], lambda v: f'{v:.2f}')} |"
        )
lines += ["", "CPU (share of one core, averaged over the scenario) and peak RSS per service:", ""]
for name, use in usage:
    lines.append(f"- **{name}**: {use.strip().rstrip(';')}")
open(out, "w").write("\n".join(lines) + "\n")
print(open(out).read())
PY
