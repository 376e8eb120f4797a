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
        # A ModelDeployment has been compressing or progressing (waves not finished) for too long: a held
        # wave, an inconclusive analysis, offline nodes with offlineNodes=Wait, a slow compression Job.
        # A rollout paused on purpose (phase Paused) does not count.
        expr: max by (namespace, modeldeployment) (kiri_modeldeployment_phase{phase=~"Compressing|Progressing"}) == 1
        for: {{ $r.stuckRolloutFor }}
        labels:
          severity: {{ $r.stuckRolloutSeverity }}
          {{- with $r.alertLabels }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        annotations:
          summary: "Rollout of {{"{{"}} $labels.namespace {{"}}"}}/{{"{{"}} $labels.modeldeployment {{"}}"}} has not finished for {{ $r.stuckRolloutFor }}"
          description: "Run `kiri status {{"{{"}} $labels.modeldeployment {{"}}"}} -n {{"{{"}} $labels.namespace {{"}}"}}` to see the held wave and its gate."
      - alert: KiriRolledBack
        # Kiri rolled edge nodes back to the last good revision after a failed gate. It stays rolled back
        # (and the alert stays on) until someone applies a changed spec: the same spec is never retried.
        expr: max by (namespace, modeldeployment) (kiri_modeldeployment_phase{phase="RolledBack"}) == 1
        labels:
          severity: {{ $r.rollbackSeverity }}
          {{- with $r.alertLabels }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        annotations:
          summary: "{{"{{"}} $labels.namespace {{"}}"}}/{{"{{"}} $labels.modeldeployment {{"}}"}} rolled back to its last good revision"
          description: "The new revision failed a health gate (`kiri status {{"{{"}} $labels.modeldeployment {{"}}"}} -n {{"{{"}} $labels.namespace {{"}}"}}` says which). The same spec is not rolled out again; apply a fixed one."
      - alert: KiriVariantRejected
        # The compression Job measured a variant below its fidelity gate; it is never rolled out.
        expr: max by (namespace, modeldeployment, variant) (kiri_variants{state="Rejected"}) == 1
        labels:
          severity: {{ $r.rejectedVariantSeverity }}
          {{- with $r.alertLabels }}
          {{- toYaml . | nindent 10 }}
          {{- end }}
        annotations:
          summary: "Variant {{"{{"}} $labels.variant {{"}}"}} of {{"{{"}} $labels.namespace {{"}}"}}/{{"{{"}} $labels.modeldeployment {{"}}"}} was rejected by its fidelity gate"
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
