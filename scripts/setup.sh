#!/usr/bin/env bash
# Idempotent set-up: Debian packages, a virtual environment with every Python dependency.
# A second run with nothing changed returns in about a second.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$(pwd)
VENV="$ROOT/.venv"
TORCH_VERSION="${TORCH_VERSION:-2.13.0}"

need_apt=()
command -v prometheus >/dev/null 2>&1 || need_apt+=(prometheus)
command -v promtool >/dev/null 2>&1 || need_apt+=(prometheus)
command -v prometheus-alertmanager >/dev/null 2>&1 || need_apt+=(prometheus-alertmanager)
# headless Chromium and its driver: the status page's browser tests (selenium)
command -v chromium >/dev/null 2>&1 || need_apt+=(chromium)
command -v chromedriver >/dev/null 2>&1 || need_apt+=(chromium-driver)
if [ ${#need_apt[@]} -gt 0 ]; then
  echo "setup: installing Debian packages: ${need_apt[*]}"
  SUDO=""
  [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -q
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${need_apt[@]}"
fi

if [ ! -x "$VENV/bin/python" ]; then
  echo "setup: creating virtual environment in $VENV"
  python3.11 -m venv "$VENV" 2>/dev/null || python3 -m venv "$VENV"
fi

# PyPI's CDN sometimes cuts a large download (torch's CUDA wheels are ~400 MB each): retry and resume
export PIP_RETRIES="${PIP_RETRIES:-10}" PIP_RESUME_RETRIES="${PIP_RESUME_RETRIES:-10}" PIP_TIMEOUT="${PIP_TIMEOUT:-60}"

stamp="$VENV/.sentinel-setup-stamp"
want="$(cat pyproject.toml scripts/setup.sh inference_core/kernels/*.cpp | sha256sum | cut -d' ' -f1) torch=$TORCH_VERSION"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "setup: installing Python dependencies"
  "$VENV/bin/python" -m pip install -q --upgrade pip setuptools wheel
  # torch pinned: a CPU-capable build (PyPI's runs on the CPU when there is no NVIDIA GPU).
  "$VENV/bin/python" -m pip install -q "torch==$TORCH_VERSION"
  "$VENV/bin/python" -m pip install -q -e ".[dev]"
  # The decode path's CPU kernel (AVX512-BF16); a no-op on CPUs without it. About 40 s on 2 cores.
  "$VENV/bin/python" -m inference_core.kernels
  echo "$want" > "$stamp"
fi

# Elasticsearch for the log store's tests: the integration-test distribution from Maven Central
# (no bundled JDK: it runs on the default Java 17), fetched once into var/elasticsearch (ignored).
ES_VERSION="${ES_VERSION:-8.17.4}"
if [ ! -x "$ROOT/var/elasticsearch/elasticsearch-$ES_VERSION/bin/elasticsearch" ]; then
  command -v mvn >/dev/null && command -v java >/dev/null && command -v unzip >/dev/null || {
    echo "setup: installing Debian packages for Elasticsearch: maven openjdk-17-jre-headless unzip curl"
    SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
    $SUDO apt-get update -q
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends maven \
      openjdk-17-jre-headless unzip curl
  }
  echo "setup: fetching Elasticsearch $ES_VERSION (integ-test distribution) from Maven Central"
  mkdir -p "$ROOT/var/elasticsearch"
  mvn -q dependency:copy -Dartifact="org.elasticsearch.distribution.integ-test-zip:elasticsearch:$ES_VERSION:zip" \
    -DoutputDirectory="$ROOT/var/elasticsearch"
  (cd "$ROOT/var/elasticsearch" && unzip -q -o "elasticsearch-$ES_VERSION.zip" && rm -f "elasticsearch-$ES_VERSION.zip")
fi

# ElastAlert2, the peer in the log rules' parity test (tests/integration/test_elastalert_parity.py), in a
# virtual environment of its own: it pins an older elasticsearch client than sentinel's. 2.19.0 is the newest
# release that installs on Python 3.11; pytz is imported by it but not declared.
EA_VERSION="${EA_VERSION:-2.19.0}"
EA="$ROOT/var/elastalert2"
if [ "$(cat "$EA/.version" 2>/dev/null)" != "$EA_VERSION" ]; then
  echo "setup: installing ElastAlert2 $EA_VERSION into var/elastalert2"
  rm -rf "$EA"
  python3.11 -m venv "$EA" 2>/dev/null || python3 -m venv "$EA"
  "$EA/bin/python" -m pip install -q "elastalert2==$EA_VERSION" pytz
  echo "$EA_VERSION" > "$EA/.version"
fi
