#!/usr/bin/env bash
# Refreshes the JavaScript the dashboards page draws with (serving/static/vendor/) from npm: Chart.js, its
# date-fns time adapter, and chartjs-plugin-datasource-prometheus (which bundles prometheus-query).
# Each library's browser build is copied with its licence; VERSIONS records what was installed.
#   bash infra/scripts/vendor-js.sh            # the versions pinned below
#   CHARTJS=4.5.0 bash infra/scripts/vendor-js.sh
set -euo pipefail

CHARTJS=${CHARTJS:-4.6.1}
ADAPTER=${ADAPTER:-3.0.0}
PLUGIN=${PLUGIN:-2.4.2}

root=$(cd "$(dirname "$0")/../.." && pwd)
dest="$root/serving/static/vendor"
command -v npm >/dev/null 2>&1 || { echo "npm is not installed: apt-get install -y npm" >&2; exit 1; }

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
cd "$work"
npm init -y >/dev/null
npm install --no-audit --no-fund --silent \
    "chart.js@$CHARTJS" "chartjs-adapter-date-fns@$ADAPTER" "chartjs-plugin-datasource-prometheus@$PLUGIN"

mkdir -p "$dest.new"
nm="$work/node_modules"
cp "$nm/chart.js/dist/chart.umd.min.js" "$dest.new/chart.umd.min.js"
cp "$nm/chart.js/LICENSE.md" "$dest.new/LICENSE.chart.js.md"
cp "$nm/chartjs-adapter-date-fns/dist/chartjs-adapter-date-fns.bundle.min.js" "$dest.new/"
cp "$nm/chartjs-adapter-date-fns/LICENSE.md" "$dest.new/LICENSE.chartjs-adapter-date-fns.md"
cp "$nm/date-fns/LICENSE.md" "$dest.new/LICENSE.date-fns.md"
plugin_dist="$nm/chartjs-plugin-datasource-prometheus/dist"
cp "$plugin_dist/chartjs-plugin-datasource-prometheus.umd.min.js" "$dest.new/" 2>/dev/null \
    || cp "$plugin_dist/chartjs-plugin-datasource-prometheus.umd.js" "$dest.new/chartjs-plugin-datasource-prometheus.umd.min.js"
cp "$nm/chartjs-plugin-datasource-prometheus/LICENSE" "$dest.new/LICENSE.chartjs-plugin-datasource-prometheus"
cp "$nm/prometheus-query/LICENSE" "$dest.new/LICENSE.prometheus-query"
# The plugin's browser build also carries axios (prometheus-query's HTTP client).
cp "$nm/axios/LICENSE" "$dest.new/LICENSE.axios"
{
    echo "# Installed by infra/scripts/vendor-js.sh on $(date -u +%Y-%m-%d); licences beside each file."
    for pkg in chart.js chartjs-adapter-date-fns date-fns chartjs-plugin-datasource-prometheus prometheus-query axios; do
        printf '%s %s\n' "$pkg" "$(node -p "require('$nm/$pkg/package.json').version")"
    done
} > "$dest.new/VERSIONS"

rm -rf "$dest"
mv "$dest.new" "$dest"
echo "vendored into serving/static/vendor:"; cat "$dest/VERSIONS"
