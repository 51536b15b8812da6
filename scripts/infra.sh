#!/usr/bin/env bash
# Shared by scripts/test.sh, scripts/dev.sh and scripts/bench.sh: provide a
# PostgreSQL cluster and Apache Kafka on this machine, without Docker.
# Source it; it defines functions only.

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

# Path of Debian's libfaketime (the clock test runs a service whose host
# clock is off), installing the package when it is missing.
faketime_lib() {
  local lib
  for lib in /usr/lib/*/faketime/libfaketime.so.1; do
    if [ -e "$lib" ]; then
      echo "$lib"
      return 0
    fi
  done
  apt_install "libfaketime (a skewed clock for the deadline test)" libfaketime || return 1
  for lib in /usr/lib/*/faketime/libfaketime.so.1; do
    if [ -e "$lib" ]; then
      echo "$lib"
      return 0
    fi
  done
  echo "error: libfaketime is installed but libfaketime.so.1 is not where Debian puts it" >&2
  return 1
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
  # PG_EXTRA_OPTS: more server options, e.g. for a profile
  # "-c shared_preload_libraries=pg_stat_statements".
  opts="$opts ${PG_EXTRA_OPTS:-}"
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

# ---------------------------------------------------------------------------
# Apache Kafka, without Docker: the broker's jars come from Maven Central
# (scripts/kafka/pom.xml pins the version) into a cache outside the tree,
# once per machine; each broker is a KRaft node (broker and controller in one
# process) with a directory of its own.

# The repository's scripts/ directory (this file's), however it was sourced.
infra_dir() {
  cd "$(dirname "${BASH_SOURCE[0]}")" && pwd
}

# The Kafka version the project pins (scripts/kafka/pom.xml).
kafka_version() {
  sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$(infra_dir)/kafka/pom.xml"
}

# need_command CMD PACKAGE: makes sure CMD is here (as root it installs
# Debian's PACKAGE; otherwise it says what to install).
need_command() {
  command -v "$1" >/dev/null 2>&1 || apt_install "$1" "$2"
}

# The directory holding Apache Kafka's jars (libs/), a log4j configuration
# and the CLI wrappers (bin/): $SAGA_KAFKA_HOME, or a cache at
# ~/.cache/saga-kafka/<version>. The first call on a machine resolves the
# jars with Maven (about 55 MiB, 10-40 s), installing Java and Maven from
# Debian's packages when they are missing; later calls reuse the cache.
kafka_home() {
  local version dir tmp
  version=$(kafka_version) || return 1
  if [ -z "$version" ]; then
    echo "error: no kafka.version in scripts/kafka/pom.xml" >&2
    return 1
  fi
  dir=${SAGA_KAFKA_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/saga-kafka/$version}
  if [ -f "$dir/.complete" ]; then
    echo "$dir"
    return 0
  fi
  need_command java default-jre-headless >&2 || return 1
  need_command mvn maven >&2 || return 1
  echo "==> fetching Apache Kafka $version's jars from Maven Central into $dir (once per machine)" >&2
  mkdir -p "$dir"
  tmp=$(mktemp -d "$dir/libs.XXXXXX")
  if ! mvn -q -B -Dstyle.color=never -f "$(infra_dir)/kafka/pom.xml" dependency:copy-dependencies \
    -DincludeScope=runtime -DoutputDirectory="$tmp" >&2; then
    rm -rf "$tmp"
    echo "error: Maven could not resolve Apache Kafka $version (scripts/kafka/pom.xml)" >&2
    return 1
  fi
  rm -rf "$dir/libs"
  mv "$tmp" "$dir/libs"
  kafka_write_support "$dir"
  touch "$dir/.complete"
  echo "==> Apache Kafka $version ready ($(du -sh "$dir/libs" | cut -f1) of jars)" >&2
  echo "$dir"
}

# kafka_write_support DIR: the log4j configuration (warnings and errors to
# standard error) and the CLI wrappers, named as Kafka's own bin/ scripts.
kafka_write_support() {
  local dir=$1 entry name class
  mkdir -p "$dir/bin"
  cat >"$dir/log4j2.properties" <<'LOG4J'
status = warn
appender.console.type = Console
appender.console.name = STDERR
appender.console.target = SYSTEM_ERR
appender.console.layout.type = PatternLayout
appender.console.layout.pattern = [%d] %p %m (%c)%n
rootLogger.level = warn
rootLogger.appenderRef.console.ref = STDERR
# The broker says when it has started and when it shuts down.
logger.server.name = kafka.server.KafkaRaftServer
logger.server.level = info
LOG4J
  for entry in kafka-topics.sh:org.apache.kafka.tools.TopicCommand \
    kafka-console-consumer.sh:org.apache.kafka.tools.consumer.ConsoleConsumer \
    kafka-console-producer.sh:org.apache.kafka.tools.ConsoleProducer \
    kafka-consumer-groups.sh:org.apache.kafka.tools.consumer.group.ConsumerGroupCommand \
    kafka-leader-election.sh:org.apache.kafka.tools.LeaderElectionCommand \
    kafka-metadata-quorum.sh:org.apache.kafka.tools.MetadataQuorumCommand \
    kafka-storage.sh:kafka.tools.StorageTool; do
    name=${entry%%:*}
    class=${entry#*:}
    cat >"$dir/bin/$name" <<WRAPPER
#!/usr/bin/env bash
# Apache Kafka's $name, run from the jars in $dir/libs.
exec java \${KAFKA_CLI_OPTS:--Xmx256m -XX:TieredStopAtLevel=1} \\
  -Dlog4j2.configurationFile="$dir/log4j2.properties" -cp "$dir/libs/*" $class "\$@"
WRAPPER
    chmod 755 "$dir/bin/$name"
  done
}

# The JVM options of a broker: a small heap (KAFKA_HEAP_OPTS) and the G1
# settings of Kafka's own scripts (KAFKA_JVM_PERFORMANCE_OPTS).
kafka_jvm_opts() {
  echo "${KAFKA_HEAP_OPTS:--Xms64m -Xmx384m} ${KAFKA_JVM_PERFORMANCE_OPTS:--XX:+UseG1GC -XX:MaxGCPauseMillis=20 -XX:InitiatingHeapOccupancyPercent=35 -XX:+ExplicitGCInvokesConcurrent -Djava.awt.headless=true}"
}

# A KRaft cluster ID: 16 random bytes, URL-safe base64 without padding,
# never starting with '-' (which a command line would take for an option;
# Kafka's own IDs avoid it too).
kafka_cluster_id() {
  python3 -c '
import base64, uuid
while True:
    s = base64.urlsafe_b64encode(uuid.uuid4().bytes).decode().rstrip("=")
    if not s.startswith("-"):
        print(s)
        break'
}

# kafka_configure DIR NODE_ID PORT CONTROLLER_PORT VOTERS [REPLICAS]:
# writes DIR/server.properties for a combined broker+controller node that
# listens on 127.0.0.1:PORT (clients) and CONTROLLER_PORT (the quorum);
# VOTERS is controller.quorum.voters (id@host:port,...). REPLICAS (default
# 1) is the cluster's size: the internal topics and new topics get that
# many replicas, and min.insync.replicas is 2 once there are three.
# KAFKA_EXTRA_CONFIG (lines of key=value) is appended.
kafka_configure() {
  local dir=$1 id=$2 port=$3 cport=$4 voters=$5 replicas=${6:-1} min_isr=1
  if [ "$replicas" -ge 3 ]; then min_isr=2; fi
  mkdir -p "$dir/data"
  cat >"$dir/server.properties" <<PROPS
process.roles=broker,controller
node.id=$id
controller.quorum.voters=$voters
listeners=PLAINTEXT://127.0.0.1:$port,CONTROLLER://127.0.0.1:$cport
advertised.listeners=PLAINTEXT://127.0.0.1:$port
controller.listener.names=CONTROLLER
inter.broker.listener.name=PLAINTEXT
listener.security.protocol.map=PLAINTEXT:PLAINTEXT,CONTROLLER:PLAINTEXT
log.dirs=$dir/data
num.partitions=3
default.replication.factor=$replicas
min.insync.replicas=$min_isr
offsets.topic.replication.factor=$replicas
offsets.topic.num.partitions=3
transaction.state.log.replication.factor=$replicas
transaction.state.log.min.isr=$min_isr
transaction.state.log.num.partitions=3
share.coordinator.state.topic.replication.factor=$replicas
share.coordinator.state.topic.min.isr=$min_isr
# A new group forms at once instead of waiting 3 s for more members.
group.initial.rebalance.delay.ms=0
# The log cleaner's dedupe buffer is 128 MiB of heap by default; the only
# compacted topic here is the small __consumer_offsets.
log.cleaner.dedupe.buffer.size=2097152
# Room for messages larger than the services' producers send (librdkafka
# stops at 1,000,000 bytes): the tests produce such messages themselves.
message.max.bytes=2097152
# KIP-848 consumer groups (group.protocol=consumer): a member is dropped
# after 10 s without a heartbeat, as classic members are here (the broker's
# default is 45 s); heartbeats every 2 s.
group.consumer.min.session.timeout.ms=6000
group.consumer.session.timeout.ms=10000
group.consumer.min.heartbeat.interval.ms=1000
group.consumer.heartbeat.interval.ms=2000
num.network.threads=2
num.io.threads=4
num.recovery.threads.per.data.dir=1
PROPS
  if [ -n "${KAFKA_EXTRA_CONFIG:-}" ]; then
    printf '%s\n' "$KAFKA_EXTRA_CONFIG" >>"$dir/server.properties"
  fi
}

# kafka_format DIR CLUSTER_ID: formats DIR's log directory for the cluster.
kafka_format() {
  local dir=$1 cluster=$2 home
  home=$(kafka_home) || return 1
  java -Xmx256m -XX:TieredStopAtLevel=1 -Dlog4j2.configurationFile="$home/log4j2.properties" \
    -cp "$home/libs/*" kafka.tools.StorageTool format --cluster-id="$cluster" \
    -c "$dir/server.properties" --ignore-formatted >"$dir/format.log" 2>&1 || {
    cat "$dir/format.log" >&2
    return 1
  }
}

# kafka_port DIR: the client port of the node configured in DIR.
kafka_port() {
  sed -n 's|^advertised.listeners=PLAINTEXT://127.0.0.1:\([0-9]*\)$|\1|p' "$1/server.properties"
}

# kafka_run DIR: starts the node configured in DIR in the background (pid
# in DIR/kafka.pid, output appended to DIR/kafka.log) and waits until its
# client port answers: with a fixed port, Kafka opens it once it is ready.
kafka_run() {
  local dir=$1 home port pid waited=0
  home=$(kafka_home) || return 1
  port=$(kafka_port "$dir")
  # A node killed a moment ago may hold its port until its last thread
  # is gone: wait for that, but never start beside a live one.
  while (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
    waited=$((waited + 1))
    if [ "$waited" -ge 50 ]; then
      echo "error: 127.0.0.1:$port still answers: another process holds Kafka's port" >&2
      return 1
    fi
    sleep 0.2
  done
  waited=0
  # shellcheck disable=SC2046 # the options are words
  nohup java $(kafka_jvm_opts) -Dlog4j2.configurationFile="$home/log4j2.properties" \
    -cp "$home/libs/*" kafka.Kafka "$dir/server.properties" >>"$dir/kafka.log" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$dir/kafka.pid"
  until (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; do
    if ! kill -0 "$pid" 2>/dev/null; then
      echo "error: Kafka in $dir exited while starting:" >&2
      tail -n 30 "$dir/kafka.log" >&2
      return 1
    fi
    sleep 0.2
    waited=$((waited + 1))
    if [ "$waited" -ge 600 ]; then
      echo "error: Kafka in $dir not listening on 127.0.0.1:$port after 120 s:" >&2
      tail -n 30 "$dir/kafka.log" >&2
      return 1
    fi
  done
}

# start_kafka DIR PORT: a single Kafka node (broker and controller) for
# clients on 127.0.0.1:PORT, keeping its log in DIR/data. A DIR that holds a
# node already is started again as it was (its ports, its data): topics,
# messages and consumer groups' offsets survive.
start_kafka() {
  local dir=$1 port=$2 cport
  if [ ! -f "$dir/data/meta.properties" ]; then
    cport=$(free_port)
    kafka_configure "$dir" 1 "$port" "$cport" "1@127.0.0.1:$cport" 1
    kafka_format "$dir" "$(kafka_cluster_id)" || return 1
  fi
  kafka_run "$dir"
}

# start_kafka_cluster DIR PORT1 PORT2 PORT3: three nodes in DIR/node1..3,
# each a broker and one of three controller voters, with replication factor
# 3 and min.insync.replicas=2. Started again as they were when DIR holds them.
start_kafka_cluster() {
  local dir=$1 cluster voters="" i failed=0
  local -a ports=("$2" "$3" "$4") cports=()
  if [ ! -f "$dir/node1/data/meta.properties" ]; then
    cluster=$(kafka_cluster_id)
    for i in 0 1 2; do
      cports[i]=$(free_port)
      voters="$voters${voters:+,}$((i + 1))@127.0.0.1:${cports[i]}"
    done
    for i in 0 1 2; do
      kafka_configure "$dir/node$((i + 1))" "$((i + 1))" "${ports[i]}" "${cports[i]}" "$voters" 3
      kafka_format "$dir/node$((i + 1))" "$cluster" || return 1
    done
  fi
  # No node serves clients before the quorum has a leader, which takes two
  # voters: start the three together, then wait for each.
  local -a starting=()
  for i in 1 2 3; do
    kafka_run "$dir/node$i" &
    starting+=("$!")
  done
  for i in "${starting[@]}"; do
    wait "$i" || failed=1
  done
  if [ "$failed" -ne 0 ]; then
    echo "error: the three-node Kafka cluster in $dir did not start (logs in $dir/node*/kafka.log)" >&2
  fi
  return "$failed"
}

# stop_kafka DIR: SIGTERM (a controlled shutdown), then SIGKILL after 10 s.
stop_kafka() {
  stop_pidfile "$1/kafka.pid"
}

# ---------------------------------------------------------------------------
# Jaeger v2 (the user's trace viewer), without Docker: built once per machine
# from its Go module into a cache outside the tree.

# The Jaeger release the project pins (the v1.75.0 module tag is Jaeger v2).
JAEGER_MODULE_VERSION=v1.75.0

# Path of a Jaeger v2 binary: $JAEGER_BIN, or the cache at
# ~/.cache/saga-jaeger/<version>/jaeger, built there the first time with Go
# (about 10 minutes on 2 cores, a 121 MB binary and 1.3 GB of Go module
# cache). Fails, saying so, when Go is not installed.
jaeger_bin() {
  local dir build
  if [ -n "${JAEGER_BIN:-}" ]; then
    echo "$JAEGER_BIN"
    return 0
  fi
  dir=${SAGA_JAEGER_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/saga-jaeger/$JAEGER_MODULE_VERSION}
  if [ -x "$dir/jaeger" ]; then
    echo "$dir/jaeger"
    return 0
  fi
  if ! command -v go >/dev/null 2>&1; then
    echo "error: Jaeger v2 is built from its Go module, and there is no go here (Debian: apt-get install golang-go, Go 1.24 or newer)" >&2
    return 1
  fi
  echo "==> building Jaeger v2 ($JAEGER_MODULE_VERSION) into $dir once per machine (about 10 minutes)" >&2
  mkdir -p "$dir"
  build=$(mktemp -d "$dir/build.XXXXXX")
  # A throwaway module: `go install pkg@version` refuses Jaeger's module
  # because of its replace directives; `go get -tool` then `go build` works.
  if ! (cd "$build" && go mod init saga-jaeger-build >/dev/null 2>&1 &&
    go get -tool "github.com/jaegertracing/jaeger/cmd/jaeger@$JAEGER_MODULE_VERSION" >&2 &&
    go build -o "$dir/jaeger.tmp" github.com/jaegertracing/jaeger/cmd/jaeger >&2); then
    rm -rf "$build"
    echo "error: building Jaeger $JAEGER_MODULE_VERSION failed" >&2
    return 1
  fi
  rm -rf "$build"
  mv "$dir/jaeger.tmp" "$dir/jaeger"
  echo "$dir/jaeger"
}

# start_jaeger DIR OTLP_GRPC OTLP_HTTP UI [QUERY_GRPC]: Jaeger v2 all-in-one
# with in-memory storage, its OTLP receiver on 127.0.0.1:OTLP_GRPC (gRPC)
# and OTLP_HTTP (HTTP), its UI and query API on 127.0.0.1:UI; pid in
# DIR/jaeger.pid, output in DIR/jaeger.log. Waits until the UI answers.
start_jaeger() {
  local dir=$1 grpc=$2 http=$3 ui=$4 query_grpc=${5:-} bin pid
  [ -n "$query_grpc" ] || query_grpc=$(free_port)
  bin=$(jaeger_bin) || return 1
  mkdir -p "$dir"
  cat >"$dir/jaeger.yaml" <<YAML
service:
  extensions: [jaeger_storage, jaeger_query]
  pipelines:
    traces:
      receivers: [otlp]
      processors: [batch]
      exporters: [jaeger_storage_exporter]
  telemetry:
    metrics:
      level: none
    logs:
      level: warn
extensions:
  jaeger_storage:
    backends:
      memstore:
        memory:
          max_traces: 100000
  jaeger_query:
    storage:
      traces: memstore
    http:
      endpoint: 127.0.0.1:$ui
    grpc:
      endpoint: 127.0.0.1:$query_grpc
receivers:
  otlp:
    protocols:
      grpc:
        endpoint: 127.0.0.1:$grpc
      http:
        endpoint: 127.0.0.1:$http
processors:
  batch:
    timeout: 200ms
exporters:
  jaeger_storage_exporter:
    trace_storage: memstore
YAML
  nohup "$bin" --config "$dir/jaeger.yaml" >>"$dir/jaeger.log" 2>&1 </dev/null &
  pid=$!
  echo "$pid" >"$dir/jaeger.pid"
  wait_for_port 127.0.0.1 "$ui" 60 || {
    tail -n 30 "$dir/jaeger.log" >&2
    return 1
  }
  wait_for_port 127.0.0.1 "$http" 30 || {
    tail -n 30 "$dir/jaeger.log" >&2
    return 1
  }
}

stop_jaeger() {
  stop_pidfile "$1/jaeger.pid"
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
