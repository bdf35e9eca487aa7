#!/usr/bin/env bash
# Start, stop or ask after a local single-node Elasticsearch (the integ-test distribution that
# scripts/setup.sh fetched from Maven Central into var/elasticsearch/).
#   scripts/elasticsearch.sh start|stop|status
# Environment: ES_PORT (9200), ES_HOME_DIR (var/elasticsearch/run: config, data, logs, pid),
# ES_HEAP (1g). It refuses to run as root, so as root it runs as the unprivileged user sentinel-es.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
ES_VERSION="${ES_VERSION:-8.17.4}"
DIST="$ROOT/var/elasticsearch/elasticsearch-$ES_VERSION"
RUN="${ES_HOME_DIR:-$ROOT/var/elasticsearch/run}"
PORT="${ES_PORT:-9200}"
HEAP="${ES_HEAP:-1g}"
USER_NAME=sentinel-es
url="http://127.0.0.1:$PORT"

health() { curl -sf "$url/_cluster/health?wait_for_status=yellow&timeout=${1:-1s}" 2>/dev/null; }

start() {
  [ -x "$DIST/bin/elasticsearch" ] || { echo "elasticsearch: $DIST missing: run scripts/setup.sh" >&2; exit 2; }
  if [ -f "$RUN/pid" ] && kill -0 "$(cat "$RUN/pid")" 2>/dev/null; then
    echo "elasticsearch: already running (pid $(cat "$RUN/pid"), $url)"; return 0
  fi
  mkdir -p "$RUN/config/jvm.options.d" "$RUN/data" "$RUN/logs"
  # Fresh each start, so the edits below are never applied twice.
  find "$DIST/config" -maxdepth 1 -type f -exec cp -f {} "$RUN/config/" \;
  cat > "$RUN/config/elasticsearch.yml" <<YML
cluster.name: sentinel
node.name: sentinel-es
discovery.type: single-node
network.host: 127.0.0.1
http.port: $PORT
transport.port: 0
path.data: $RUN/data
path.logs: $RUN/logs
xpack.security.enabled: false
cluster.routing.allocation.disk.threshold_enabled: false
action.destructive_requires_name: false
YML
  printf -- '-Xms%s\n-Xmx%s\n' "$HEAP" "$HEAP" > "$RUN/config/jvm.options.d/heap.options"
  # The JVM's own logs (GC, fatal errors, heap dumps) go to this run's folder, not the distribution's.
  sed -i -e "s#logs/#$RUN/logs/#g" -e "s#=data\b#=$RUN/data#g" "$RUN/config/jvm.options"
  java_home=$(dirname "$(dirname "$(readlink -f "$(command -v java)")")")
  local runas=()
  if [ "$(id -u)" -eq 0 ]; then
    id "$USER_NAME" >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin "$USER_NAME"
    chown -R "$USER_NAME" "$RUN"
    chmod o+rx "$ROOT" "$ROOT/var" "$ROOT/var/elasticsearch" 2>/dev/null || true
    runas=(runuser -u "$USER_NAME" --)
  fi
  # From the run folder: the JVM options write logs/gc.log relative to the working directory.
  (cd "$RUN" && "${runas[@]}" env ES_JAVA_HOME="$java_home" ES_PATH_CONF="$RUN/config" \
    "$DIST/bin/elasticsearch" -d -p "$RUN/pid") > "$RUN/logs/stdout.log" 2>&1 || {
      echo "elasticsearch: failed to start; see $RUN/logs" >&2; tail -20 "$RUN/logs/stdout.log" >&2; exit 1; }
  for _ in $(seq 1 120); do
    if health 1s >/dev/null; then echo "elasticsearch: up at $url (pid $(cat "$RUN/pid"))"; return 0; fi
    sleep 1
  done
  echo "elasticsearch: not healthy after 120 s; see $RUN/logs" >&2; exit 1
}

stop() {
  if [ -f "$RUN/pid" ]; then
    pid=$(cat "$RUN/pid")
    kill "$pid" 2>/dev/null || true
    for _ in $(seq 1 60); do kill -0 "$pid" 2>/dev/null || break; sleep 0.5; done
    kill -9 "$pid" 2>/dev/null || true
    rm -f "$RUN/pid"
  fi
  echo "elasticsearch: stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  status) if health 1s; then echo; else echo "elasticsearch: not answering at $url"; exit 1; fi ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
