"""Pure planning: (spec, observed world) -> plan. No Kubernetes or kopf imports, no clock, no I/O."""
