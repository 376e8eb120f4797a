//go:build tools

// Package tools pins CoreDNS, the real nodes' cluster DNS (a host process), built by hack/build-binaries.
package tools

import _ "github.com/coredns/coredns"
