#!/usr/bin/env bash
# Debian packages that `alloy demo` and the report test use: fortunes-de, fortunes-es and fortunes-it
# (the demo's German, Spanish and Italian texts) and chromium (a test renders the HTML report in it). Best effort, never fails the setup: without
# apt-get or root it says what is missing; the demo then names the package, the test skips.
set -uo pipefail
want=()
[ -d /usr/share/games/fortunes/de ] || want+=(fortunes-de)
[ -d /usr/share/games/fortunes/es ] || want+=(fortunes-es)
[ -d /usr/share/games/fortunes/it ] || want+=(fortunes-it)
command -v chromium >/dev/null 2>&1 || want+=(chromium)
[ ${#want[@]} -eq 0 ] && exit 0
if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
  if ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${want[@]}"; } >/dev/null 2>&1; then
    echo "note: apt-get could not install ${want[*]}; the demo needs fortunes-de, -es and -it for its German, Spanish and Italian domains, the report test needs chromium" >&2
  fi
else
  echo "note: install ${want[*]} with your system's package manager (needs root); the demo needs fortunes-de, -es and -it for its German, Spanish and Italian domains, the report test needs chromium" >&2
fi
exit 0
