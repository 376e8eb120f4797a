#!/usr/bin/env bash
# Installs the Debian packages the tests need (a real Prometheus for analysis gates).
#
# With `--real-nodes`, also what `hack/cluster up --real-nodes N` and hack/images.py need: the CNI
# plugins (bridge, host-local, loopback in /usr/lib/cni), iproute2 and util-linux (veths, network
# namespaces, nsenter), libseccomp-dev (runc is built with seccomp), and the Docker-free image tools
# (mmdebstrap for a Debian rootfs, umoci and skopeo for OCI archives, gcc + libc6-dev for the static pause).
# Versions are Debian bookworm's (containernetworking-plugins 1.1.1, umoci 0.4.7, skopeo 1.9.3,
# mmdebstrap 1.3.5): the snapshot the machine's apt sources name pins them.
set -euo pipefail
missing=()
command -v prometheus >/dev/null 2>&1 || missing+=(prometheus)
# hack/cluster makes the control plane's certificates with it.
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
if [[ "${1:-}" == "--real-nodes" ]]; then
  [[ -x /usr/lib/cni/bridge && -x /usr/lib/cni/host-local && -x /usr/lib/cni/loopback ]] ||
    missing+=(containernetworking-plugins)
  command -v ip >/dev/null 2>&1 || missing+=(iproute2)
  command -v nsenter >/dev/null 2>&1 || missing+=(util-linux)
  [[ -e /usr/include/seccomp.h ]] || missing+=(libseccomp-dev)
  command -v mmdebstrap >/dev/null 2>&1 || missing+=(mmdebstrap)
  command -v umoci >/dev/null 2>&1 || missing+=(umoci)
  command -v skopeo >/dev/null 2>&1 || missing+=(skopeo)
  command -v gcc >/dev/null 2>&1 || missing+=(gcc)
  [[ -e /usr/lib/x86_64-linux-gnu/libc.a || -e /usr/lib/aarch64-linux-gnu/libc.a ]] || missing+=(libc6-dev)
fi
if ((${#missing[@]} == 0)); then
  echo "[debs] all installed"
  exit 0
fi
SUDO=""
if [[ $(id -u) -ne 0 ]]; then SUDO="sudo"; fi
echo "[debs] installing ${missing[*]} ..."
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
# The package starts nothing here (no systemd); tests start their own Prometheus on 127.0.0.1.
echo "[debs] installed ${missing[*]}"
