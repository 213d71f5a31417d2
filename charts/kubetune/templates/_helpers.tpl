{{/* Names and labels. */}}
{{- define "kubetune.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "kubetune.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "kubetune.labels" -}}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: kubetune
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/*
The permissions the operator needs in every namespace it watches. Each rule is listed with its
reason in docs/security.md, and tests/integration/test_rbac_chart.py checks that every API call
the operator makes is allowed by these rules and that no rule is unused or undocumented.
No wildcards; no Secrets (credentials reach pods only as secretKeyRef, which needs no read).
*/}}
{{- define "kubetune.namespacedRules" -}}
# The two custom resources: Kopf lists/watches them, the reconcilers read them afresh.
# delete: a finished FineTuneJob with spec.ttlSecondsAfterFinished removes itself.
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs"]
  verbs: ["get", "list", "watch", "delete"]
# patch: the rollout removes the one-shot kubetune.io/promote and kubetune.io/abort annotations
# once it has acted on them.
- apiGroups: ["kubetune.io"]
  resources: ["modeldeployments"]
  verbs: ["get", "list", "watch", "patch"]
# The one status write of a reconcile. get on finetunejobs/status: the per-job trainer Role
# grants get+patch on one FineTuneJob's status, and RBAC only lets us grant what we hold.
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs/status"]
  verbs: ["get", "patch"]
- apiGroups: ["kubetune.io"]
  resources: ["modeldeployments/status"]
  verbs: ["patch"]
# ownerReferences with blockOwnerDeletion need this where OwnerReferencesPermissionEnforcement
# is on (OpenShift and hardened clusters).
- apiGroups: ["kubetune.io"]
  resources: ["finetunejobs/finalizers", "modeldeployments/finalizers"]
  verbs: ["update"]
# Validate/train Jobs: created, observed, replaced after a failed attempt or on suspend.
- apiGroups: ["batch"]
  resources: ["jobs"]
  verbs: ["get", "list", "watch", "create", "delete"]
# Trainer and server pods: read-only, for termination messages, scheduling/pull/OOM reasons
# and (built-in analysis) the serving pods' IPs to scrape.
- apiGroups: [""]
  resources: ["pods"]
  verbs: ["list", "watch"]
# Torchrun rendezvous (headless) Services; per-revision and stable serving Services.
- apiGroups: [""]
  resources: ["services"]
  verbs: ["get", "create", "patch", "delete"]
# The per-job trainer identity (ServiceAccount, Role, RoleBinding). get on ServiceAccounts also
# reads spec.storage.serviceAccountName to copy its workload-identity annotations.
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get", "create", "patch"]
- apiGroups: ["rbac.authorization.k8s.io"]
  resources: ["roles", "rolebindings"]
  verbs: ["get", "create", "patch"]
# Serving revisions.
- apiGroups: ["apps"]
  resources: ["deployments"]
  verbs: ["get", "list", "watch", "create", "patch", "delete"]
- apiGroups: ["policy"]
  resources: ["poddisruptionbudgets"]
  verbs: ["get", "create", "patch", "delete"]
# Weighted canary traffic (traffic.mode gatewayAPI).
- apiGroups: ["gateway.networking.k8s.io"]
  resources: ["httproutes"]
  verbs: ["get", "create", "patch"]
# Events for kubectl describe (Kopf's and ours).
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- if .Values.rbac.readApiKeySecrets }}
# Opt-in (rbac.readApiKeySecrets): the eval gate reads the key named by
# spec.server.apiKeySecret to send the golden prompts to a server that requires it.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end }}
{{- end -}}

{{- define "kubetune.args" -}}
- run
- --module=kubetune.handlers
- --module=kubetune.startup
- --liveness=http://0.0.0.0:{{ .Values.health.port }}/healthz
{{- if .Values.watchNamespaces }}
{{- range .Values.watchNamespaces }}
- --namespace={{ . }}
{{- end }}
{{- else }}
- --all-namespaces
{{- end }}
{{- if .Values.peering.enabled }}
- --peering={{ .Values.peering.name }}
{{- else }}
- --standalone
{{- end }}
{{- if eq .Values.logLevel "debug" }}
- --debug
{{- else if eq .Values.logLevel "warning" }}
- --quiet
{{- end }}
{{- range .Values.extraArgs }}
- {{ . | quote }}
{{- end }}
{{- end -}}

{{/*
The operator's cluster-wide pod defaults as JSON (KUBETUNE_POD_DEFAULTS): the images default to
the chart's appVersion, so upgrading the chart moves new jobs and revisions to the same version.
*/}}
{{- define "kubetune.podDefaults" -}}
{{- $d := .Values.defaults -}}
{{- dict
  "trainerImage" ($d.trainerImage | default (printf "ghcr.io/kubetune/trainer:%s" .Chart.AppVersion))
  "serverImage" ($d.serverImage | default (printf "ghcr.io/kubetune/server:%s" .Chart.AppVersion))
  "imagePullSecrets" ($d.imagePullSecrets | default list)
  "gpuNodeSelector" ($d.gpuNodeSelector | default dict)
  "gpuTolerations" ($d.gpuTolerations | default list)
  | toJson -}}
{{- end -}}
