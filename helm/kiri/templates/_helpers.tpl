{{/* Chart name, overridable. */}}
{{- define "kiri.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name: <release>-kiri, or the release name alone when it already contains the chart name. */}}
{{- define "kiri.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 63 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/*
Name of cluster-scoped objects (ClusterRole, ClusterRoleBinding). Releases are unique per namespace, but
cluster-scoped names are not, so the namespace is part of the name.
*/}}
{{- define "kiri.clusterName" -}}
{{- printf "%s-%s" (include "kiri.fullname" .) .Release.Namespace | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The leader-election Lease, in the release namespace. */}}
{{- define "kiri.leaseName" -}}
{{- default (printf "%s-leader" (include "kiri.fullname" .)) .Values.leaderElection.leaseName | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Namespaces where the chart makes the Jobs' ServiceAccount, Role and RoleBinding. */}}
{{- define "kiri.compressorNamespaces" -}}
{{- toJson (default .Values.operator.watchNamespaces .Values.compressor.namespaces) }}
{{- end }}

{{- define "kiri.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kiri.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kiri.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kiri.labels" -}}
helm.sh/chart: {{ include "kiri.chart" . }}
{{ include "kiri.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kiri
{{- end }}

{{- define "kiri.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kiri.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "kiri.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/*
The operator's namespaced permissions. Rendered into one ClusterRole (all namespaces) or one Role per
watched namespace. Verbs are the minimum: the operator only reads ModelDeployments (kopf runs event
handlers only, so it writes no annotations or finalizers) and applies their status; it
server-side-applies its children, which is `patch`, and deletes children of old revisions; pods are only read (readiness per node). Secrets are only created (the learning TLS Secret), never read; no pod exec, no
"bind" or "escalate".
*/}}
{{- define "kiri.namespacedRules" -}}
- apiGroups: ["kiri.dev"]
  resources: ["modeldeployments"]
  verbs: ["get", "list", "watch"]
- apiGroups: ["kiri.dev"]
  resources: ["modeldeployments/status"]
  verbs: ["get", "patch", "update"]
# Children carry owner references with blockOwnerDeletion, which clusters with the
# OwnerReferencesPermissionEnforcement admission plugin only allow to whoever may update the owner's
# finalizers.
- apiGroups: ["kiri.dev"]
  resources: ["modeldeployments/finalizers"]
  verbs: ["update"]
- apiGroups: ["apps"]
  resources: ["deployments", "daemonsets"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["get", "list", "watch"]
# The learning rounds' NetworkPolicies: only a ModelDeployment's SuperNodes and round Jobs reach its SuperLink,
# no one reaches a SuperNode.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
# The learning rounds' TLS Secret (a CA and the SuperLink's certificate) and SuperNode key Secrets (a key pair
# per site): create only. The operator never gets, lists or watches a Secret, so it can read none, its own
# included.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create"]
{{- if .Values.compressor.createPerModelDeployment }}
# compressor.createPerModelDeployment: each ModelDeployment's Jobs run under a ServiceAccount the operator
# makes, whose Role names the ConfigMaps they write. Only in watched namespaces (a Role each, never a
# ClusterRole), and the API server's escalation check means the operator can only grant what it holds.
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "list", "watch", "create", "patch", "update", "delete"]
{{- end }}
# A spec naming a pvc:// source is checked for its claim before anything is created.
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get"]
# One Event per decision; each is a new object (kopf's own event posting is off). list: the DaemonSet
# and Job controllers' FailedCreate Events about Kiri's children say why admission refused their pods.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create", "list"]
{{- end }}

{{/*
Relabelings of the serving pods' series: Kiri's pod labels become target labels. `component`, not
`tier`, because the runtime's own kiri_responses_total already has a `tier` label (who answered).
*/}}
{{- define "kiri.servingRelabelings" -}}
relabelings:
  - sourceLabels: [__meta_kubernetes_namespace]
    targetLabel: namespace
  - sourceLabels: [__meta_kubernetes_pod_label_kiri_dev_modeldeployment]
    targetLabel: modeldeployment
  - sourceLabels: [__meta_kubernetes_pod_label_kiri_dev_revision]
    targetLabel: revision
  - sourceLabels: [__meta_kubernetes_pod_label_kiri_dev_adapters]
    targetLabel: adapters
  - sourceLabels: [__meta_kubernetes_pod_label_app_kubernetes_io_component]
    targetLabel: component
  - sourceLabels: [__meta_kubernetes_pod_node_name]
    targetLabel: node
{{- end }}

{{/*
The in-cluster artifact store (templates/store.yaml): its name and the URI ModelDeployments default to.
*/}}
{{- define "kiri.storeName" -}}
{{- printf "%s-store" (include "kiri.fullname" .) | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kiri.storeURI" -}}
{{- printf "http://%s.%s.svc:%d" (include "kiri.storeName" .) .Release.Namespace (int .Values.store.port) }}
{{- end }}

{{- define "kiri.storeSelectorLabels" -}}
app.kubernetes.io/name: {{ include "kiri.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: store
{{- end }}

{{- define "kiri.storeLabels" -}}
helm.sh/chart: {{ include "kiri.chart" . }}
{{ include "kiri.storeSelectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kiri
{{- end }}
