{{/*
Kiri's alerts as a Prometheus rule-file body (`groups: ...`). Kept in one helper so the same text is in
the PrometheusRule and in the file tests/e2e/test_helm.py feeds to `promtool test rules`.
*/}}
{{- define "kiri.alertGroups" -}}
{{- $r := .Values.metrics.prometheusRule }}
{{- $job := printf "%s-metrics" (include "kiri.fullname" .) }}
groups:
  - name: kiri.rules
    rules:
      - alert: KiriRolloutStuck
        # A ModelDeployment has been progressing (waves not finished) for too long: a held wave, an
        # inconclusive analysis, offline nodes with offlineNodes=Wait, or a paused rollout.
        expr: max by (namespace, name) (kiri_modeldeployment_phase{phase="Progressing"}) == 1
        for: {{ $r.stuckRolloutFor }}
        labels:
          severity: {{ $r.stuckRolloutSeverity }}
          {{- with $r.alertLabels }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        annotations:
          summary: "Rollout of {{"{{"}} $labels.namespace {{"}}"}}/{{"{{"}} $labels.name {{"}}"}} has not finished for {{ $r.stuckRolloutFor }}"
          description: "Run `kiri status {{"{{"}} $labels.name {{"}}"}} -n {{"{{"}} $labels.namespace {{"}}"}}` to see the held wave and its gate."
      - alert: KiriRolledBack
        # Kiri rolled edge nodes back to the last good revision after a failed gate.
        expr: sum by (namespace, name, reason) (increase(kiri_rollbacks_total[{{ $r.rollbackWindow }}])) > 0
        labels:
          severity: {{ $r.rollbackSeverity }}
          {{- with $r.alertLabels }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        annotations:
          summary: "{{"{{"}} $labels.namespace {{"}}"}}/{{"{{"}} $labels.name {{"}}"}} rolled back ({{"{{"}} $labels.reason {{"}}"}})"
          description: "The new revision failed a health gate. The same spec is not rolled out again; apply a fixed one."
      - alert: KiriVariantRejected
        # The compression Job measured a variant below its fidelity gate; it is never rolled out.
        expr: max by (namespace, name, variant) (kiri_variants{state="Rejected"}) > 0
        labels:
          severity: {{ $r.rejectedVariantSeverity }}
          {{- with $r.alertLabels }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        annotations:
          summary: "Variant {{"{{"}} $labels.variant {{"}}"}} of {{"{{"}} $labels.namespace {{"}}"}}/{{"{{"}} $labels.name {{"}}"}} was rejected by its fidelity gate"
          description: "Nodes that needed it keep the previous revision. See status.variants for the measured fidelity."
      - alert: KiriOperatorDown
        # No operator is being scraped: nothing reconciles, rolls out or rolls back.
        expr: absent(up{job="{{ $job }}"} == 1)
        for: 5m
        labels:
          severity: {{ $r.operatorDownSeverity }}
          {{- with $r.alertLabels }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        annotations:
          summary: "The Kiri operator ({{ $job }}) is down or not scraped"
          description: "Check `kubectl -n {{ .Release.Namespace }} get pods -l app.kubernetes.io/component=operator`."
{{- end }}
