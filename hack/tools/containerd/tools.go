//go:build tools

// Package tools pins the container runtime of the real nodes (containerd, its runc shim, ctr), built by
// hack/build-binaries.
package tools

import (
	_ "github.com/containerd/containerd/v2/cmd/containerd"
	_ "github.com/containerd/containerd/v2/cmd/containerd-shim-runc-v2"
	_ "github.com/containerd/containerd/v2/cmd/ctr"
)
