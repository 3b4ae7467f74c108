#!/usr/bin/env bash
# Render the monitoring report in headless Chromium and save a screenshot to look at.
#
#   scripts/check_report.sh [REPORT_HTML] [SCREENSHOT_PNG]
#
# Without REPORT_HTML it builds a demo report first: a fresh PROMPT_CAPTURE_HOME (temporary
# directory) with two weeks of synthetic traffic and a three-version registry
# (python -m tests.report_data), then `prompt-capture report`. Needs Debian's chromium
# (apt-get install -y chromium). Exits non-zero when Chromium fails or writes no screenshot.
# Then open SCREENSHOT_PNG and check: six sections, plots drawn, tables readable.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-$repo/.venv/bin/python}"
chromium="${CHROMIUM:-$(command -v chromium || command -v chromium-browser || true)}"
if [[ -z "$chromium" ]]; then
    echo "chromium not found: apt-get install -y chromium (or set CHROMIUM=/path/to/chrome)" >&2
    exit 2
fi

report="${1:-}"
screenshot="${2:-$repo/report-screenshot.png}"
if [[ -z "$report" ]]; then
    home="$(mktemp -d)"
    report="$home/report.html"
    (cd "$repo" && "$python" -m tests.report_data "$home")
    PROMPT_CAPTURE_HOME="$home" "$python" -c "from deployments.cli import main; main()" report --days 30 --output "$report" \
        --now 2026-11-26T12:00:00+00:00
fi
[[ -s "$report" ]] || { echo "report $report is missing or empty" >&2; exit 1; }

profile="$(mktemp -d)"
trap 'rm -rf "$profile"' EXIT
rm -f "$screenshot"
timeout 120 "$chromium" --headless --no-sandbox --disable-gpu --disable-background-networking \
    --disable-component-update --disable-sync --no-first-run --hide-scrollbars \
    --user-data-dir="$profile" --screenshot="$screenshot" --window-size=1280,3000 \
    "file://$(realpath "$report")" 2>/dev/null
[[ -s "$screenshot" ]] || { echo "chromium wrote no screenshot" >&2; exit 1; }
echo "report:     $report"
echo "screenshot: $screenshot"
