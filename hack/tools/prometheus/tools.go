//go:build tools

// Package tools pins Prometheus for the real-node e2e: Debian's prometheus package (2.42) is built without
// Kubernetes service discovery, and the test discovers the serving pods with kubernetes_sd_configs.
// hack/build-binaries.sh builds it with `-tags remove_all_sd,enable_kubernetes_sd` (file, http and
// kubernetes discovery only: no cloud SDKs).
package tools

import _ "github.com/prometheus/prometheus/cmd/prometheus"
