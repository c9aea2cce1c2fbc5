#!/usr/bin/env bash
# Installs the system packages Tandem uses beside Python: Prometheus (and promtool), Alertmanager (and amtool),
# the Postgres exporter, and headless Chromium. (npm is needed only to refresh the vendored JavaScript: vendor-js.sh.)
# Runs apt-get only as root and only for what is missing; otherwise prints what to install.
set -euo pipefail

need=()
command -v prometheus >/dev/null 2>&1 || need+=(prometheus)
command -v promtool >/dev/null 2>&1 || need+=(prometheus)
command -v prometheus-alertmanager >/dev/null 2>&1 || need+=(prometheus-alertmanager)
command -v amtool >/dev/null 2>&1 || need+=(prometheus-alertmanager)
command -v prometheus-postgres-exporter >/dev/null 2>&1 || need+=(prometheus-postgres-exporter)
command -v chromium >/dev/null 2>&1 || need+=(chromium)
[ ${#need[@]} -eq 0 ] && exit 0

mapfile -t need < <(printf '%s\n' "${need[@]}" | sort -u)
if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "installing system packages: ${need[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
    # Debian's packages start a system Prometheus on :9090 (and Alertmanager, the exporter); Tandem runs its
    # own on its own ports, so stop those.
    for svc in prometheus prometheus-alertmanager prometheus-postgres-exporter; do
        if command -v systemctl >/dev/null 2>&1; then systemctl disable --now "$svc" >/dev/null 2>&1 || true; fi
        if [ -x "/etc/init.d/$svc" ]; then "/etc/init.d/$svc" stop >/dev/null 2>&1 || true; fi
    done
else
    echo "note: missing system packages (${need[*]}); install them with: sudo apt-get install -y ${need[*]}" >&2
fi
