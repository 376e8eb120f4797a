// Command coredns is CoreDNS with only the plugins the real nodes' Corefile uses (hack/realnodes.py,
// write_corefile): bind, errors, kubernetes, cache and template. CoreDNS's own main imports every plugin
// (core/plugin/zplugin.go), and with them the cloud SDKs of route53, azure and clouddns, the tracing and
// dnstap stacks: most of a cold build. A main that imports the plugins it wants is CoreDNS's documented
// way to build with fewer (coremain keeps the full directive order; a directive whose plugin is not
// compiled in is refused when a Corefile names it).
package main

import (
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/bind"
	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/template"
)

func main() {
	coremain.Run()
}
