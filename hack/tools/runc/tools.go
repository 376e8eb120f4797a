//go:build tools

// Package tools pins runc, the OCI runtime the real nodes' containerd shim runs, built by hack/build-binaries.
package tools

import _ "github.com/opencontainers/runc"
