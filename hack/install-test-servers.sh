#!/usr/bin/env bash
# Installs the S3-compatible test server (moto) into its own virtualenv under the Kiri cache.
# It lives apart from .venv because moto pins python-dateutil below what the kubernetes client needs.
set -euo pipefail
KIRI_CACHE="${KIRI_CACHE:-$HOME/.cache/kiri}"
MOTO_VERSION="5.2.5"
venv="$KIRI_CACHE/moto-$MOTO_VERSION-venv"
# The marker is written last, so an interrupted install is redone rather than trusted.
if [[ -f "$venv/.kiri-complete" ]]; then
  echo "[test-servers] moto $MOTO_VERSION: installed ($venv)"
  exit 0
fi
echo "[test-servers] moto $MOTO_VERSION: installing into $venv ..."
rm -rf "$venv"
python3 -m venv "$venv"
"$venv/bin/pip" install --quiet "moto[server]==$MOTO_VERSION"
touch "$venv/.kiri-complete"
echo "[test-servers] moto $MOTO_VERSION: installed"
