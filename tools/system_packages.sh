#!/usr/bin/env bash
# The Debian packages the suite drives for real: Chromium and CJK fonts (the web UI tests, whose pages
# carry Chinese text), redis-server (the cluster tests). Installs what is missing; says what to do where
# it cannot. `make test` and CI both run this.
set -euo pipefail

missing=()
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
fc-list 2>/dev/null | grep -qi "noto sans cjk" || missing+=(fonts-noto-cjk)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
[ ${#missing[@]} -eq 0 ] && exit 0

if ! command -v apt-get >/dev/null 2>&1; then
  echo "The tests need ${missing[*]} (Debian package names), and this system has no apt-get:" >&2
  echo "install them with your system's package manager, then run make test again." >&2
  exit 1
fi
sudo=""
if [ "$(id -u)" != 0 ]; then
  if ! command -v sudo >/dev/null 2>&1; then
    echo "The tests need ${missing[*]}: run 'apt-get install -y ${missing[*]}' as root, then make test again." >&2
    exit 1
  fi
  sudo=sudo
fi
echo "Installing ${missing[*]} for the tests (apt-get) ..."
export DEBIAN_FRONTEND=noninteractive
$sudo apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
  || { $sudo apt-get update -q >/dev/null && $sudo apt-get install -y -q "${missing[@]}" >/dev/null; } \
  || { echo "apt-get could not install ${missing[*]}; install them by hand, then run make test again." >&2; exit 1; }
