#!/usr/bin/env bash
# Checks what can be checked without a Docker engine: shell scripts
# (shellcheck), the compose file (docker compose config, when the plugin is
# there) and the Dockerfile (hadolint when present, else our own rules).
set -euo pipefail
cd "$(dirname "$0")/.."

shell_scripts=(kafka-topics.sh scripts/*.sh .ci/run)

if ! command -v shellcheck >/dev/null 2>&1 && [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
  echo "==> installing shellcheck (Debian)"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null &&
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq shellcheck >/dev/null
fi
if command -v shellcheck >/dev/null 2>&1; then
  echo "==> shellcheck ${shell_scripts[*]}"
  shellcheck -x "${shell_scripts[@]}"
else
  echo "error: shellcheck is not installed and could not be installed" >&2
  exit 1
fi

if docker compose version >/dev/null 2>&1; then
  echo "==> docker compose config -q"
  docker compose config -q
else
  echo "==> skipping 'docker compose config': no Docker Compose plugin on this machine"
fi

if command -v hadolint >/dev/null 2>&1; then
  echo "==> hadolint Dockerfile"
  hadolint Dockerfile
else
  echo "==> Dockerfile rules (hadolint not available here)"
  fail=0
  check() { # description, then a command that must succeed
    local what=$1
    shift
    if "$@"; then echo "    ok: $what"; else echo "    FAIL: $what" >&2; fail=1; fi
  }
  check "every FROM pins a tag (no implicit or :latest)" \
    bash -c '! grep -E "^FROM " Dockerfile | grep -vE "^FROM [^ ]+:[^ ]+( AS [a-z]+)?$" | grep -q . && ! grep -qE "^FROM [^ ]+:latest" Dockerfile'
  # shellcheck disable=SC2016 # the single-quoted scripts are meant for the inner bash
  check "runtime stage runs as a non-root user" \
    bash -c 'awk "/^FROM .* AS runtime/{r=1} r && /^USER /{u=\$2} END{exit !(u != \"\" && u != \"root\" && u != \"0\")}" Dockerfile'
  # shellcheck disable=SC2016
  check "apt lists are removed in the same layer" \
    bash -c '[ "$(grep -c "apt-get install" Dockerfile)" -eq "$(grep -c "rm -rf /var/lib/apt/lists" Dockerfile)" ]'
  check "apt-get install uses --no-install-recommends" \
    bash -c '! grep "apt-get install" Dockerfile | grep -qv -- "--no-install-recommends"'
  check "the image has a HEALTHCHECK" grep -q "^HEALTHCHECK" Dockerfile
  check "nothing is built at container start (ENTRYPOINT is the binary)" \
    grep -qE '^ENTRYPOINT \["/usr/local/bin/service"\]' Dockerfile
  [ "$fail" -eq 0 ] || exit 1
fi

echo "==> monitoring: alerting rules, their unit tests, the Prometheus config, the dashboard"
# shellcheck source=scripts/infra.sh
source scripts/infra.sh
prometheus_bin >/dev/null
promtool check rules monitoring/prometheus/alerts.yml
(cd monitoring/prometheus && promtool test rules alerts.test.yml)
promtool check config --syntax-only monitoring/prometheus/prometheus.yml
python3 - <<'PY'
import json, sys
d = json.load(open("monitoring/grafana/dashboards/saga.json"))
exprs = [t.get("expr", "") for p in d["panels"] for t in p.get("targets", [])]
bad = [p["title"] for p in d["panels"] if not p.get("targets")]
if bad or not all(exprs):
    print(f"    FAIL: panels without an expression: {bad}", file=sys.stderr)
    sys.exit(1)
print(f"    ok: dashboard {d['uid']!r}, {len(d['panels'])} panels, {len(exprs)} expressions")
PY

echo "==> compose file sanity"
python3 - <<'PY'
import re, sys
text = open("docker-compose.yml").read()
need = ["apache/kafka:", "postgres:", "jaegertracing/jaeger:2.", "service_completed_successfully",
        "service_healthy", "16686:16686", "3000:3000", "3001-3009:3001", "3002-3009:3002", "9092:9092",
        "OTEL_EXPORTER_OTLP_ENDPOINT", "kafka-topics.sh", "kafkadata:/var/lib/kafka/data",
        "KAFKA_LOG_DIRS: /var/lib/kafka/data", "prom/prometheus:", "grafana/grafana:", "3030:3000",
        "./monitoring/prometheus/alerts.yml", "./monitoring/grafana/dashboards"]
missing = [n for n in need if n not in text]
images = re.findall(r"image:\s*(\S+)", text)
unpinned = [i for i in images if ":" not in i or i.endswith(":latest")]
# A frozen patch tag gets no security rebuilds: PostgreSQL by major version.
frozen = [i for i in images if re.match(r"postgres:\d+\.\d+", i)]
unpinned += frozen
# Compose runs the Kafka version the scripts and tests run (scripts/kafka/pom.xml).
pinned = re.search(r"<kafka.version>(.*)</kafka.version>", open("scripts/kafka/pom.xml").read()).group(1)
other = [i for i in images if i.startswith("apache/kafka:") and i != f"apache/kafka:{pinned}"]
if other:
    print(f"    FAIL: {other} differ from Kafka {pinned} in scripts/kafka/pom.xml", file=sys.stderr)
    sys.exit(1)
if missing or unpinned:
    print(f"    FAIL: missing {missing}, unpinned images {unpinned}", file=sys.stderr)
    sys.exit(1)
print(f"    ok: {len(images)} pinned images, dependencies and ports in place")
PY
