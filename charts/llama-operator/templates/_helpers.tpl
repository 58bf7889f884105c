{{/* Chart name, truncated to the 63 characters a label value allows. */}}
{{- define "llama-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Full name prefix of every object: "<release>-<chart>", or "<release>" when it already holds the chart name. */}}
{{- define "llama-operator.fullname" -}}
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

{{/* "name-version" for the helm.sh/chart label. */}}
{{- define "llama-operator.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Selector labels: stable for the life of a release (a Deployment's selector is immutable). */}}
{{- define "llama-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "llama-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/*
Standard labels. Call with (dict "ctx" $ "component" "operator").
*/}}
{{- define "llama-operator.labels" -}}
{{- $ctx := .ctx -}}
helm.sh/chart: {{ include "llama-operator.chart" $ctx }}
{{ include "llama-operator.selectorLabels" $ctx }}
app.kubernetes.io/version: {{ $ctx.Chart.AppVersion | quote }}
app.kubernetes.io/component: {{ .component }}
app.kubernetes.io/part-of: llama-operator
app.kubernetes.io/managed-by: {{ $ctx.Release.Service }}
{{- end }}

{{/* Selector labels of the operator pods. */}}
{{- define "llama-operator.operatorSelectorLabels" -}}
{{ include "llama-operator.selectorLabels" . }}
app.kubernetes.io/component: operator
{{- end }}

{{/* The operator's ServiceAccount name. */}}
{{- define "llama-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "llama-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator image reference: repository@digest, else repository:tag (tag defaults to appVersion). */}}
{{- define "llama-operator.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}
{{- end }}

{{/* "true" when kopf peering is on: explicitly, or because more than one replica runs. */}}
{{- define "llama-operator.peeringEnabled" -}}
{{- if or .Values.peering.enabled (gt (int .Values.replicaCount) 1) }}true{{- end }}
{{- end }}

{{/* Name of the kopf peering object. */}}
{{- define "llama-operator.peeringName" -}}
{{- default (include "llama-operator.fullname" .) .Values.peering.name }}
{{- end }}

{{/* Watched namespaces when namespaced (fails without any), as a list. */}}
{{- define "llama-operator.watchedNamespaces" -}}
{{- if .Values.watch.namespaced }}
{{- if not .Values.watch.namespaces }}
{{- fail "watch.namespaces: list at least one namespace when watch.namespaced is true" }}
{{- end }}
{{- toYaml (uniq .Values.watch.namespaces) }}
{{- else }}
{{- toYaml list }}
{{- end }}
{{- end }}

{{/*
Permissions the operator needs in every namespace it manages (contract: docs/install.md, RBAC).
Cluster-wide install: a ClusterRole. Namespaced install: a Role in each watched namespace.
*/}}
{{- define "llama-operator.namespacedRules" -}}
- apiGroups: ["llama-operator.dev"]
  resources: ["llamadeployments"]
  verbs: ["list", "watch", "patch"]
- apiGroups: ["llama-operator.dev"]
  resources: ["llamadeployments/status"]
  verbs: ["patch"]
# delete: the workload of the other kind once a plan moves between one node (a Deployment) and several.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# Replicas that span nodes (docs/multinode.md), where LeaderWorkerSet is installed.
- apiGroups: ["leaderworkerset.x-k8s.io"]
  resources: ["leaderworkersets"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "list", "watch", "create", "patch"]
- apiGroups: [""]
  resources: ["persistentvolumeclaims"]
  verbs: ["get", "create"]
# spec.access.allowedClients: the NetworkPolicy in front of a model server (delete: once the spec drops it).
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- if and .Values.watch.namespaced (not .Values.watch.podsAllNamespaces) }}
# watch.podsAllNamespaces false: Pods (what they hold of their nodes) in the watched namespaces only.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
{{- end }}
{{- if and .Values.watch.namespaced (include "llama-operator.peeringEnabled" .) }}
- apiGroups: ["kopf.dev"]
  resources: ["kopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end }}

{{/* Cluster-wide reads the operator needs: Nodes in either mode; Pods unless a namespaced install keeps to
the watched namespaces' Pods (watch.podsAllNamespaces false). */}}
{{- define "llama-operator.clusterRules" -}}
- apiGroups: [""]
  {{- if or (not .Values.watch.namespaced) .Values.watch.podsAllNamespaces }}
  resources: ["nodes", "pods"]
  {{- else }}
  resources: ["nodes"]
  {{- end }}
  verbs: ["list", "watch"]
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
{{- if .Values.watch.namespaced }}
- apiGroups: [""]
  resources: ["namespaces"]
  verbs: ["list", "watch"]
{{- end }}
{{- if and (not .Values.watch.namespaced) (include "llama-operator.peeringEnabled" .) }}
- apiGroups: ["kopf.dev"]
  resources: ["clusterkopfpeerings"]
  verbs: ["get", "list", "watch", "patch"]
{{- end }}
{{- end }}
