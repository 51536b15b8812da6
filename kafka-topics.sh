#!/bin/sh
# Creates the saga topics and their dead-letter topics. Safe to run twice.
#
#   BOOTSTRAP_SERVER    broker to talk to (default localhost:9092)
#   PARTITIONS          partitions per topic (default 3)
#   REPLICATION_FACTOR  replicas per partition (default 1)
#   MIN_INSYNC_REPLICAS the topics' min.insync.replicas (default: 2 when
#                       REPLICATION_FACTOR is 3 or more, else 1)
#   TOPIC_PREFIX        prefix, as the services' KAFKA_TOPIC_PREFIX (default empty)
#   KAFKA_TOPICS        the Kafka CLI to use (default: found in /opt/kafka/bin,
#                       $KAFKA_HOME/bin, the cache scripts/infra.sh fills
#                       (~/.cache/saga-kafka/<version>/bin) or PATH)
#
# Inside docker compose it runs in the apache/kafka image (see kafka-init);
# from a host: BOOTSTRAP_SERVER=localhost:9092 ./kafka-topics.sh
set -eu

BOOTSTRAP_SERVER=${BOOTSTRAP_SERVER:-localhost:9092}
PARTITIONS=${PARTITIONS:-3}
REPLICATION_FACTOR=${REPLICATION_FACTOR:-1}
if [ "$REPLICATION_FACTOR" -ge 3 ]; then
  MIN_INSYNC_REPLICAS=${MIN_INSYNC_REPLICAS:-2}
else
  MIN_INSYNC_REPLICAS=${MIN_INSYNC_REPLICAS:-1}
fi
TOPIC_PREFIX=${TOPIC_PREFIX:-}

find_cli() {
  if [ -n "${KAFKA_TOPICS:-}" ]; then
    echo "$KAFKA_TOPICS"
    return 0
  fi
  here=$(cd "$(dirname "$0")" && pwd)
  version=$(sed -n 's:.*<kafka.version>\(.*\)</kafka.version>.*:\1:p' "$here/scripts/kafka/pom.xml" 2>/dev/null || true)
  cache=${SAGA_KAFKA_HOME:-${XDG_CACHE_HOME:-$HOME/.cache}/saga-kafka/$version}
  for candidate in /opt/kafka/bin/kafka-topics.sh "${KAFKA_HOME:-/nonexistent}/bin/kafka-topics.sh" "$cache/bin/kafka-topics.sh"; do
    if [ -x "$candidate" ]; then
      echo "$candidate"
      return 0
    fi
  done
  self=$(cd "$(dirname "$0")" && pwd)/$(basename "$0")
  for name in kafka-topics.sh kafka-topics; do
    found=$(command -v "$name" 2>/dev/null || true)
    if [ -n "$found" ] && [ "$found" != "$self" ]; then
      echo "$found"
      return 0
    fi
  done
  return 1
}

if ! cli=$(find_cli); then
  echo "error: no Kafka CLI (kafka-topics.sh) found; set KAFKA_TOPICS or KAFKA_HOME, or fetch it with: bash -c 'source scripts/infra.sh; kafka_home'" >&2
  exit 1
fi

for base in order-events payment-events inventory-events; do
  for topic in "$TOPIC_PREFIX$base" "$TOPIC_PREFIX$base.dlq"; do
    "$cli" --bootstrap-server "$BOOTSTRAP_SERVER" --create --if-not-exists \
      --topic "$topic" --partitions "$PARTITIONS" --replication-factor "$REPLICATION_FACTOR" \
      --config "min.insync.replicas=$MIN_INSYNC_REPLICAS"
  done
done
echo "topics:"
"$cli" --bootstrap-server "$BOOTSTRAP_SERVER" --list | grep -E "^${TOPIC_PREFIX}(order|payment|inventory)-events" || true
