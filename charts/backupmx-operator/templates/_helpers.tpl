{{/* The chart's name (nameOverride). */}}
{{- define "backupmx-operator.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The full name of the release's objects (at most 52 characters: room for suffixes). */}}
{{- define "backupmx-operator.fullname" -}}
{{- if .Values.fullnameOverride }}
{{- .Values.fullnameOverride | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- $name := default .Chart.Name .Values.nameOverride }}
{{- if contains $name .Release.Name }}
{{- .Release.Name | trunc 52 | trimSuffix "-" }}
{{- else }}
{{- printf "%s-%s" .Release.Name $name | trunc 52 | trimSuffix "-" }}
{{- end }}
{{- end }}
{{- end }}

{{/* Labels of the pods' selector. */}}
{{- define "backupmx-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ include "backupmx-operator.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{/* Labels on every object of the chart. */}}
{{- define "backupmx-operator.labels" -}}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{ include "backupmx-operator.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: operator
app.kubernetes.io/part-of: backupmx
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* The ServiceAccount the operator runs as. */}}
{{- define "backupmx-operator.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "backupmx-operator.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name must name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The operator's image. */}}
{{- define "backupmx-operator.image" -}}
{{- printf "%s:%s" .Values.image.repository .Values.image.tag }}
{{- end }}

{{/* The default mx-pod image (--mxpod-image). */}}
{{- define "backupmx-operator.mxpodImage" -}}
{{- printf "%s:%s" .Values.mxpod.image.repository .Values.mxpod.image.tag }}
{{- end }}

{{/* Checks across values that the schema cannot express. */}}
{{- define "backupmx-operator.validate" -}}
{{- if and (gt (int .Values.replicaCount) 1) (not .Values.leaderElection.enabled) }}
{{- fail "replicaCount > 1 needs leaderElection.enabled: true (two replicas without a Lease would both reconcile)" }}
{{- end }}
{{- end }}

{{/*
The rules of the watch scope: exactly what the operator's code does in the namespaces it watches
(operator/src/reconcile: the controller's watches, server-side apply of every child, the finalizer,
the status, events, and reading Secrets). Server-side apply of an object that does not exist yet
is authorized as `create` too, hence create+patch for every applied kind.
*/}}
{{- define "backupmx-operator.watchRules" -}}
# BackupMx objects: watched (list, watch); the finalizer is added and removed with a JSON patch
- apiGroups: ["backupmx.io"]
  resources: ["backupmxes"]
  verbs: ["list", "watch", "patch"]
# status: server-side apply on the status subresource
- apiGroups: ["backupmx.io"]
  resources: ["backupmxes/status"]
  verbs: ["patch"]
# the StatefulSet of mx-pods: watched (owned), read (its current replicas: a scale-down waits
# for the pods it removes to drain) and server-side applied
- apiGroups: ["apps"]
  resources: ["statefulsets"]
  verbs: ["get", "list", "watch", "create", "patch"]
# Services (LoadBalancer, headless) and the ConfigMap: watched (owned) and server-side applied
- apiGroups: [""]
  resources: ["services", "configmaps"]
  verbs: ["list", "watch", "create", "patch"]
# Secrets: the admin token (read back, then applied; watched as owned) and the DNS credentials
# named by spec.dns.credentialsSecretRef (read)
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get", "list", "watch", "create", "patch"]
# the mx-pods: watched (their readiness and IPs) and listed to reach their admin APIs
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# the PodDisruptionBudget (policy/v1 or, before 1.21, policy/v1beta1): server-side applied
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["create", "patch"]
# the mx-pods' NetworkPolicy: watched (owned: a policy deleted or loosened by hand is put back
# at once), server-side applied, and with spec.networkPolicy.enabled=false read (is it the
# BackupMx's own?) and deleted
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
# events about BackupMx objects (events.k8s.io/v1; a repeated event is patched as a series)
- apiGroups: ["events.k8s.io"]
  resources: ["events"]
  verbs: ["create", "patch"]
{{- end }}
