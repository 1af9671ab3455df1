#!/usr/bin/env bash
# A headless-browser screenshot of an HTML page (the report): proof that it opens and that every
# figure is visible. Uses Debian's chromium, installed here when it is missing (root or sudo).
#
# Usage: scripts/screenshot.sh PAGE.html OUT.png [WIDTHxHEIGHT]   (default 1300x6800)
set -euo pipefail
page=${1:?usage: scripts/screenshot.sh PAGE.html OUT.png [WIDTHxHEIGHT]}
out=${2:?usage: scripts/screenshot.sh PAGE.html OUT.png [WIDTHxHEIGHT]}
size=${3:-1300x6800}
[[ -f $page ]] || { echo "screenshot.sh: $page: no such file" >&2; exit 1; }

browser=$(command -v chromium || command -v chromium-browser || true)
if [[ -z $browser ]]; then
  SUDO=()
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null 2>&1 || { echo "screenshot.sh: not root and no sudo; install Debian's chromium" >&2; exit 1; }
    SUDO=(sudo)
  fi
  echo "screenshot.sh: installing Debian's chromium (once)"
  "${SUDO[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${SUDO[@]}" apt-get install -y -qq --no-install-recommends chromium fonts-dejavu-core >/dev/null
  browser=$(command -v chromium)
fi
mkdir -p "$(dirname "$out")"
# --no-sandbox: CI and containers run as root, where chromium's sandbox refuses to start
"$browser" --headless --no-sandbox --disable-gpu --hide-scrollbars --window-size="${size/x/,}" \
  --screenshot="$(realpath -m "$out")" "file://$(realpath "$page")" 2>/dev/null
[[ -s $out ]] || { echo "screenshot.sh: chromium wrote no screenshot" >&2; exit 1; }
echo "wrote $out"
