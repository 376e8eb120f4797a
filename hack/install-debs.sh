#!/usr/bin/env bash
# Installs the Debian packages the tests need (a real Prometheus for analysis gates).
set -euo pipefail
missing=()
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
# hack/cluster makes the control plane's certificates with it.
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if ((${#missing[@]} == 0)); then
  echo "[debs] prometheus, openssl: installed"
  exit 0
fi
SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
echo "[debs] installing ${missing[*]} ..."
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The package starts nothing here (no systemd); tests start their own Prometheus on 127.0.0.1.
echo "[debs] installed ${missing[*]}"
