#!/usr/bin/env bash
# Builds the local control plane (etcd, kube-apiserver, kube-controller-manager,
# kube-scheduler, kubectl, kwok, kwokctl, helm) and test tools (kstatus) from pinned Go modules, and with
# `real-nodes` what a real node runs (kubelet, kube-proxy, containerd, containerd-shim-runc-v2, ctr, runc)
# and the real nodes' cluster DNS (CoreDNS, a host process).
#
# Usage: build-binaries.sh [all|etcd|kubernetes|kwok|helm|kstatus|real-nodes|kubelet|kube-proxy|containerd|runc|coredns|prometheus]
#        build-binaries.sh --print-bin-dirs | --print-real-node-bin-dirs | --print-prometheus
# `all` is the control plane only: the real-node binaries add ~5 min to a cold build and only
# `hack/cluster up --real-nodes N` needs them.
#
# Binaries are cached under $KIRI_CACHE/bin/<component>-<version>-<go version>/ so a
# warm run only checks that the files exist. Versions come from the wrapper go.mod
# files under hack/tools/, the single place they are pinned.
set -euo pipefail

HACK_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
TOOLS_DIR="$HACK_DIR/tools"
KIRI_CACHE="${KIRI_CACHE:-$HOME/.cache/kiri}"
# Static binaries by default; runc sets BUILD_CGO=1 (libseccomp).
export GOFLAGS="${GOFLAGS:-} -mod=mod"

go_version="$(go env GOVERSION)"

module_version() { # <wrapper dir> <module path>
  awk -v m="$2" '$1 == "require" && $2 == m {print $3} $1 == m && (NF == 2 || $3 == "//") {print $2}' "$TOOLS_DIR/$1/go.mod" | head -n1
}

K8S_VERSION="$(module_version kubernetes k8s.io/kubernetes)"
ETCD_VERSION="$(module_version etcd go.etcd.io/etcd/server/v3)"
KWOK_VERSION="$(module_version kwok sigs.k8s.io/kwok)"
HELM_VERSION="$(module_version helm helm.sh/helm/v3)"
# kstatus is Kiri's own few lines around sigs.k8s.io/cli-utils: the key holds both the library's version and
# the source's hash, so an edit of main.go builds again.
KSTATUS_BUILD="$(module_version kstatus sigs.k8s.io/cli-utils)-$(cat "$TOOLS_DIR/kstatus/main.go" "$TOOLS_DIR/kstatus/go.sum" | sha256sum | cut -c1-8)"
CONTAINERD_VERSION="$(module_version containerd github.com/containerd/containerd/v2)"
RUNC_VERSION="$(module_version runc github.com/opencontainers/runc)"
# CoreDNS and Prometheus share one wrapper module (tools/coredns-prometheus): one module graph, so a cold
# build compiles their common stack (client-go, k8s.io/api, x/net, grpc) once. CoreDNS is the wrapper's own
# main.go, with only the plugins the real nodes' Corefile uses. Both keys hold the hash of the wrapper's
# go.sum (the versions of the shared stack) and CoreDNS's the hash of main.go.
CP_WRAPPER=coredns-prometheus
CP_HASH="$(cat "$TOOLS_DIR/$CP_WRAPPER/go.sum" | sha256sum | cut -c1-8)"
COREDNS_VERSION="$(module_version "$CP_WRAPPER" github.com/coredns/coredns)"
COREDNS_BUILD="$COREDNS_VERSION-slim-$(cat "$TOOLS_DIR/$CP_WRAPPER/main.go" "$TOOLS_DIR/$CP_WRAPPER/go.sum" | sha256sum | cut -c1-8)"
# Prometheus with Kubernetes service discovery (Debian's package has none): only the file, http and
# kubernetes discoverers are compiled in (build tags), and the key says so.
PROMETHEUS_VERSION="$(module_version "$CP_WRAPPER" github.com/prometheus/prometheus)"
PROMETHEUS_BUILD="$PROMETHEUS_VERSION-k8ssd-$CP_HASH"
# runc is linked against the host's libseccomp (cgo, `seccomp` tag: without it runc cannot apply the
# RuntimeDefault seccomp profile the kubelet asks for); the cache key says so.
RUNC_BUILD="$RUNC_VERSION-seccomp"

bin_dir_for() { echo "$KIRI_CACHE/bin/$1-$2-$go_version"; }

# kwok v0.8.0 starts its stage controllers in map order. When the pod controller starts before the node
# one, it is built before the node-lease controller sets kwok's read-only check, keeps a nil check, and
# goes on starting pods on a node whose lease another holder took (`hack/cluster node-offline`): one kwok
# start in two. kwok is built from a copy of the pinned module in which that check is looked up at call
# time (a one-line change made here, at build time, and checked), through a replace in a copy of the
# wrapper module; the binaries' cache key says so.
KWOK_BUILD="$KWOK_VERSION-kiri1"
kwok_patched_wrapper() { # prints the wrapper directory to build kwok from
  local src dir
  src="$(cd "$TOOLS_DIR/kwok" && go mod download -json sigs.k8s.io/kwok | sed -n 's/^[[:space:]]*"Dir": "\(.*\)",$/\1/p')"
  dir="$KIRI_CACHE/src/kwok-$KWOK_BUILD"
  rm -rf "$dir" && mkdir -p "$dir/wrapper"
  cp -R "$src" "$dir/kwok" && chmod -R u+w "$dir/kwok"
  local file="$dir/kwok/pkg/kwok/controllers/controller.go"
  sed -i -E 's/^([[:space:]]*ReadOnlyFunc:[[:space:]]*)c\.readOnlyFunc,$/\1func(node string) bool { return c.readOnlyFunc != nil \&\& c.readOnlyFunc(node) },/' "$file"
  local patched; patched="$(grep -c 'return c.readOnlyFunc != nil && c.readOnlyFunc(node)' "$file" || true)"
  if [[ "$patched" != 2 ]]; then
    echo "[build] kwok: expected 2 ReadOnlyFunc fields to patch in $file, found $patched" >&2
    return 1
  fi
  cp "$TOOLS_DIR/kwok/go.mod" "$TOOLS_DIR/kwok/go.sum" "$dir/wrapper/"
  (cd "$dir/wrapper" && go mod edit -replace "sigs.k8s.io/kwok=../kwok")
  echo "$dir/wrapper"
}

build() { # <wrapper dir> <name> <package> <version> <ldflags>
  local wrapper="$1" name="$2" pkg="$3" version="$4" ldflags="$5"
  local out; out="$(bin_dir_for "$wrapper" "$version")"
  if [[ -x "$out/$name" ]]; then
    echo "[build] $name $version: cached ($out)"
    return
  fi
  mkdir -p "$out"
  echo "[build] $name $version: building from $pkg (cold builds take minutes) ..."
  local start=$SECONDS
  (cd "${BUILD_DIR:-$TOOLS_DIR/$wrapper}" &&
    CGO_ENABLED="${BUILD_CGO:-0}" go build -trimpath -tags "${BUILD_TAGS:-}" -ldflags "$ldflags" -o "$out/$name.tmp" "$pkg")
  mv "$out/$name.tmp" "$out/$name"
  echo "[build] $name $version: done in $((SECONDS - start))s"
}

k8s_ldflags() {
  local v="$K8S_VERSION" minor; minor="$(echo "$v" | cut -d. -f2)"
  local p
  for p in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    printf -- '-X %s.gitVersion=%s -X %s.gitMajor=1 -X %s.gitMinor=%s -X %s.gitTreeState=clean -X %s.buildDate=1970-01-01T00:00:00Z ' \
      "$p" "$v" "$p" "$p" "$minor" "$p" "$p"
  done
  printf -- '-s -w'
}

main() {
  local which="${1:-all}"
  local kl; kl="$(k8s_ldflags)"
  if [[ "$which" == all || "$which" == etcd ]]; then
    build etcd etcd go.etcd.io/etcd/server/v3 "$ETCD_VERSION" "-s -w"
  fi
  if [[ "$which" == all || "$which" == kubernetes ]]; then
    for c in kube-apiserver kube-controller-manager kube-scheduler kubectl; do
      build kubernetes "$c" "k8s.io/kubernetes/cmd/$c" "$K8S_VERSION" "$kl"
    done
  fi
  if [[ "$which" == all || "$which" == kwok ]]; then
    local kwl="-s -w -X sigs.k8s.io/kwok/pkg/consts.Version=$KWOK_VERSION"
    # The patched copy is made only when something is to be built; cached binaries need none.
    local kwok_dir wrapper=""; kwok_dir="$(bin_dir_for kwok "$KWOK_BUILD")"
    if [[ ! -x "$kwok_dir/kwok" || ! -x "$kwok_dir/kwokctl" ]]; then
      wrapper="$(kwok_patched_wrapper)"
    fi
    BUILD_DIR="$wrapper" build kwok kwok sigs.k8s.io/kwok/cmd/kwok "$KWOK_BUILD" "$kwl"
    BUILD_DIR="$wrapper" build kwok kwokctl sigs.k8s.io/kwok/cmd/kwokctl "$KWOK_BUILD" "$kwl"
    [[ -z "$wrapper" ]] || rm -rf "$(dirname "$wrapper")"
  fi
  if [[ "$which" == real-nodes || "$which" == kubelet ]]; then
    build kubernetes kubelet k8s.io/kubernetes/cmd/kubelet "$K8S_VERSION" "$kl"
  fi
  if [[ "$which" == real-nodes || "$which" == kube-proxy ]]; then
    build kubernetes kube-proxy k8s.io/kubernetes/cmd/kube-proxy "$K8S_VERSION" "$kl"
  fi
  if [[ "$which" == real-nodes || "$which" == coredns ]]; then
    BUILD_DIR="$TOOLS_DIR/$CP_WRAPPER" build coredns coredns "kiri.dev/hack/tools/$CP_WRAPPER" "$COREDNS_BUILD" \
      "-s -w -X github.com/coredns/coredns/coremain.GitCommit=$COREDNS_VERSION"
  fi
  if [[ "$which" == real-nodes || "$which" == containerd ]]; then
    local cl="-s -w -X github.com/containerd/containerd/v2/version.Version=$CONTAINERD_VERSION"
    local c
    for c in containerd containerd-shim-runc-v2 ctr; do
      build containerd "$c" "github.com/containerd/containerd/v2/cmd/$c" "$CONTAINERD_VERSION" "$cl"
    done
  fi
  if [[ "$which" == real-nodes || "$which" == runc ]]; then
    if [[ ! -e /usr/include/seccomp.h ]]; then
      echo "[build] runc: libseccomp-dev is missing (hack/install-debs.sh --real-nodes installs it)" >&2
      return 1
    fi
    BUILD_CGO=1 BUILD_TAGS=seccomp build runc runc github.com/opencontainers/runc "$RUNC_BUILD" \
      "-s -w -X main.version=${RUNC_VERSION#v}"
  fi
  if [[ "$which" == real-nodes || "$which" == prometheus ]]; then
    # Module v0.MMP.x is Prometheus M.MP.x (v0.316.0 is 3.16.0).
    local pv="github.com/prometheus/common/version" mm rest release
    mm="${PROMETHEUS_VERSION#v0.}"; rest="${mm#*.}"; mm="${mm%%.*}"
    release="$((10#$mm / 100)).$((10#$mm % 100)).$rest"
    BUILD_DIR="$TOOLS_DIR/$CP_WRAPPER" BUILD_TAGS=remove_all_sd,enable_kubernetes_sd build prometheus prometheus \
      github.com/prometheus/prometheus/cmd/prometheus "$PROMETHEUS_BUILD" \
      "-s -w -X $pv.Version=$release -X $pv.Branch=kiri -X $pv.Revision=$PROMETHEUS_VERSION"
  fi
  if [[ "$which" == all || "$which" == helm ]]; then
    build helm helm helm.sh/helm/v3/cmd/helm "$HELM_VERSION" "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION"
  fi
  if [[ "$which" == all || "$which" == kstatus ]]; then
    build kstatus kstatus kiri.dev/hack/tools/kstatus "$KSTATUS_BUILD" "-s -w"
  fi
}

if [[ "${1:-}" == "--print-bin-dirs" ]]; then
  bin_dir_for etcd "$ETCD_VERSION"; bin_dir_for kubernetes "$K8S_VERSION"
  bin_dir_for kwok "$KWOK_BUILD"; bin_dir_for helm "$HELM_VERSION"; bin_dir_for kstatus "$KSTATUS_BUILD"
  exit 0
fi
if [[ "${1:-}" == "--print-real-node-bin-dirs" ]]; then
  # The kubelet sits with the other Kubernetes binaries.
  bin_dir_for kubernetes "$K8S_VERSION"; bin_dir_for containerd "$CONTAINERD_VERSION"; bin_dir_for runc "$RUNC_BUILD"
  bin_dir_for coredns "$COREDNS_BUILD"
  exit 0
fi
if [[ "${1:-}" == "--print-prometheus" ]]; then
  echo "$(bin_dir_for prometheus "$PROMETHEUS_BUILD")/prometheus"
  exit 0
fi
main "$@"
