#!/usr/bin/env bash
# Installs what the GUI's browser test needs: Debian's chromium (driven by Playwright through executable_path)
# and a small CJK font so the Chinese labels render in screenshots. Idempotent: does nothing when both exist.
set -euo pipefail

need=()
command -v chromium >/dev/null 2>&1 || need+=(chromium)
dpkg -s fonts-wqy-microhei >/dev/null 2>&1 || need+=(fonts-wqy-microhei)

if [ ${#need[@]} -eq 0 ]; then
  echo "install_browser: chromium and fonts already installed ($(chromium --version 2>/dev/null | head -1))"
  exit 0
fi

SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  SUDO="sudo"
fi
echo "install_browser: installing ${need[*]}"
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq "${need[@]}"
chromium --version
