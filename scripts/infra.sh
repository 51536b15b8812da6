#!/usr/bin/env bash
# Shared by scripts/test.sh, scripts/dev.sh and scripts/bench.sh: provide a
# throwaway PostgreSQL cluster and a Kafka-protocol broker (tansu) on this
# machine, without Docker. Source it; it defines functions only.

# Prints a free TCP port on 127.0.0.1.
free_port() {
  python3 - <<'PY'
import socket
s = socket.socket()
s.bind(("127.0.0.1", 0))
print(s.getsockname()[1])
s.close()
PY
}

# Prints the free space on the file system of the current directory (the
# build writes target/ there), as df's human-readable figure.
disk_free() {
  df -h . | awk 'NR == 2 { print $4 }'
}

# Waits until host:port accepts TCP connections, or fails after $3 seconds.
wait_for_port() {
  local host=$1 port=$2 limit=${3:-30} waited=0
  until (exec 3<>"/dev/tcp/$host/$port") 2>/dev/null; do
    sleep 0.2
    waited=$((waited + 1))
    if [ "$waited" -ge $((limit * 5)) ]; then
      echo "error: nothing listening on $host:$port after ${limit}s" >&2
      return 1
    fi
  done
}

# apt_install WHAT PACKAGE: installs a Debian package (as root), saying why.
apt_install() {
  echo "$1 not found; installing Debian's $2 package" >&2
  if [ "$(id -u)" -ne 0 ]; then
    echo "error: run as root or install $1 yourself" >&2
    return 1
  fi
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2 &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2" >&2
}

# Directory holding initdb/pg_ctl/postgres, installing Debian's postgresql
# package when none is found.
pg_bindir() {
  local d
  for d in "$(dirname "$(command -v pg_ctl 2>/dev/null || echo /nonexistent/x)")" /usr/lib/postgresql/*/bin; do
    if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
      # Resolve symlinks so pg_ctl finds its sibling postgres binary.
      dirname "$(readlink -f "$d/pg_ctl")"
      return 0
    fi
  done
  apt_install "PostgreSQL server binaries (initdb, pg_ctl)" postgresql || return 1
  for d in /usr/lib/postgresql/*/bin; do
    if [ -x "$d/initdb" ]; then
      echo "$d"
      return 0
    fi
  done
  echo "error: postgresql installed but initdb still not found" >&2
  return 1
}

# Path of Debian's prometheus (server and promtool come together),
# installing the package when it is missing. Prints the server's path.
prometheus_bin() {
  if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
    command -v prometheus
    return 0
  fi
  apt_install "Prometheus (prometheus, promtool)" prometheus || return 1
  command -v prometheus
}

# Path of Debian's Chromium (the API test renders Swagger UI in it),
# installing the package when it is missing.
chromium_bin() {
  if command -v chromium >/dev/null 2>&1; then
    command -v chromium
    return 0
  fi
  apt_install "Chromium (headless browser for the Swagger UI test)" chromium || return 1
  command -v chromium
}

# Makes sure openssl is here (the authentication tests make their keys
# with it).
need_openssl() {
  command -v openssl >/dev/null 2>&1 || apt_install "openssl (test keys)" openssl
}

# url_with_db URL DB: URL (postgres://user:pass@host:port[/db][?params]) with
# its database replaced by DB.
url_with_db() {
  local url=$1 db=$2 query="" rest
  case $url in *\?*)
    query="?${url#*\?}"
    url=${url%%\?*}
    ;;
  esac
  rest=${url#*://}
  echo "${url%%://*}://${rest%%/*}/$db$query"
}

# Path of a psql client, or nothing (never installs one).
psql_bin() {
  local d
  if command -v psql >/dev/null 2>&1; then
    command -v psql
    return 0
  fi
  for d in /usr/lib/postgresql/*/bin; do
    if [ -x "$d/psql" ]; then
      echo "$d/psql"
      return 0
    fi
  done
}

# Runs a command as the user that owns the cluster: PostgreSQL refuses root.
as_pg_user() {
  if [ "$(id -u)" -eq 0 ]; then
    runuser -u postgres -- "$@"
  else
    "$@"
  fi
}

# start_postgres DIR PORT [durable]
# Creates a cluster in DIR/data and starts it on 127.0.0.1:PORT with trust
# auth for user postgres. Without "durable", fsync is off (tests).
start_postgres() {
  local dir=$1 port=$2 durable=${3:-}
  local bin
  bin=$(pg_bindir) || return 1
  mkdir -p "$dir"
  if [ "$(id -u)" -eq 0 ]; then
    chown postgres "$dir"
    chmod 700 "$dir"
  fi
  if [ ! -f "$dir/data/PG_VERSION" ]; then
    as_pg_user "$bin/initdb" -D "$dir/data" -U postgres --auth=trust -E UTF8 --no-locale >"$dir/initdb.log" 2>&1 || {
      cat "$dir/initdb.log" >&2
      return 1
    }
  fi
  local opts="-c listen_addresses=127.0.0.1 -p $port -k $dir -c max_connections=400 -c shared_buffers=256MB"
  if [ "$durable" != "durable" ]; then
    opts="$opts -c fsync=off -c synchronous_commit=off -c full_page_writes=off"
  fi
  as_pg_user "$bin/pg_ctl" -D "$dir/data" -o "$opts" -l "$dir/postgres.log" -w -t 60 start >/dev/null || {
    cat "$dir/postgres.log" >&2
    return 1
  }
}

stop_postgres() {
  local dir=$1 bin
  [ -f "$dir/data/postmaster.pid" ] || return 0
  bin=$(pg_bindir) || return 1
  as_pg_user "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
}

# Path of the tansu binary, building it once per machine if missing
# (cargo install: about 20-25 minutes on 2 cores).
tansu_bin() {
  local t
  t=$(command -v tansu 2>/dev/null || true)
  [ -z "$t" ] && [ -x "${CARGO_HOME:-$HOME/.cargo}/bin/tansu" ] && t="${CARGO_HOME:-$HOME/.cargo}/bin/tansu"
  if [ -z "$t" ]; then
    echo "tansu (Kafka-compatible broker) not found; building it once with cargo install (about 20-25 minutes)" >&2
    cargo install tansu --locked --features dynostore >&2 || return 1
    t="${CARGO_HOME:-$HOME/.cargo}/bin/tansu"
  fi
  echo "$t"
}

# tansu_keeps_data BIN: whether BIN was built with the libsql feature, so
# it can keep topics and group offsets in a SQLite file. Without it, tansu
# refuses a sqlite:// storage engine at once (FeatureNotEnabled).
tansu_keeps_data() {
  local bin=$1 dir port pid ok=1
  dir=$(mktemp -d "${TMPDIR:-/tmp}/tansu-probe.XXXXXX")
  port=$(free_port)
  env -u OTEL_EXPORTER_OTLP_ENDPOINT -C "$dir" RUST_LOG=error "$bin" broker \
    --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine sqlite://probe.db >"$dir/log" 2>&1 &
  pid=$!
  if wait_for_port 127.0.0.1 "$port" 20 2>/dev/null && kill -0 "$pid" 2>/dev/null; then
    ok=0
  fi
  kill "$pid" 2>/dev/null || true
  wait "$pid" 2>/dev/null || true
  rm -rf "$dir"
  return "$ok"
}

# Path of a tansu that can keep its data on disk (for scripts/dev.sh). A
# tansu built without libsql (what tansu_bin builds) is rebuilt with it,
# never used in memory without saying so: about 30 minutes on 2 cores,
# once per machine. The rebuilt binary serves the tests too.
tansu_durable_bin() {
  local t home=${CARGO_HOME:-$HOME/.cargo}
  t=$(command -v tansu 2>/dev/null || true)
  [ -z "$t" ] && [ -x "$home/bin/tansu" ] && t="$home/bin/tansu"
  if [ -n "$t" ] && tansu_keeps_data "$t"; then
    echo "$t"
    return 0
  fi
  if [ -n "$t" ]; then
    echo "tansu at $t was built without the libsql feature, so it cannot keep topics on disk;" >&2
    echo "rebuilding it with cargo install tansu --locked --features dynostore,libsql (about 30 minutes, once)" >&2
  else
    echo "tansu (Kafka-compatible broker) not found; building it once with libsql (about 30 minutes)" >&2
  fi
  cargo install tansu --locked --features dynostore,libsql --force >&2 || return 1
  t="$home/bin/tansu"
  if ! tansu_keeps_data "$t"; then
    echo "error: $t still cannot use a sqlite:// storage engine" >&2
    return 1
  fi
  echo "$t"
}

# start_tansu_durable PORT LOGFILE PIDFILE DIR: a broker on 127.0.0.1:PORT
# that keeps topics and group offsets in DIR/tansu.db across restarts.
# (tansu takes the SQLite path relative to its working directory: an
# absolute path after sqlite:// is mangled.)
start_tansu_durable() {
  local port=$1 log=$2 pidfile=$3 dir=$4 bin
  bin=$(tansu_durable_bin) || return 1
  mkdir -p "$dir"
  env -u OTEL_EXPORTER_OTLP_ENDPOINT -C "$dir" RUST_LOG=warn "$bin" broker \
    --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine sqlite://tansu.db >"$log" 2>&1 &
  echo $! >"$pidfile"
  wait_for_port 127.0.0.1 "$port" 30 || {
    cat "$log" >&2
    return 1
  }
}

# start_tansu PORT LOGFILE PIDFILE: an in-memory broker on 127.0.0.1:PORT.
start_tansu() {
  local port=$1 log=$2 pidfile=$3 bin
  bin=$(tansu_bin) || return 1
  # tansu reads OTEL_EXPORTER_OTLP_ENDPOINT too; keep its telemetry off.
  env -u OTEL_EXPORTER_OTLP_ENDPOINT RUST_LOG=warn "$bin" broker \
    --listener-url "tcp://127.0.0.1:$port" \
    --advertised-listener-url "tcp://127.0.0.1:$port" \
    --storage-engine memory://tansu/ >"$log" 2>&1 &
  echo $! >"$pidfile"
  wait_for_port 127.0.0.1 "$port" 30 || {
    cat "$log" >&2
    return 1
  }
}

stop_pidfile() {
  local pidfile=$1 pid
  [ -f "$pidfile" ] || return 0
  pid=$(cat "$pidfile")
  if kill -0 "$pid" 2>/dev/null; then
    kill -TERM "$pid" 2>/dev/null || true
    for _ in $(seq 1 50); do
      kill -0 "$pid" 2>/dev/null || break
      sleep 0.2
    done
    kill -KILL "$pid" 2>/dev/null || true
  fi
  rm -f "$pidfile"
}
