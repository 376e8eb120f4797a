// Wrapper module: builds Prometheus (v3.16.0, module v0.316.0) with Kubernetes service discovery.
module kiri.dev/hack/tools/prometheus

go 1.26.7

require github.com/prometheus/prometheus v0.316.0
