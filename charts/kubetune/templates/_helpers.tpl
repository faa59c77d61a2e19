{{/* Names, labels and the operator's permissions: each defined once and used by every template. */}}

{{- define "kubetune.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kubetune.fullname" -}}
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

{{- define "kubetune.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "kubetune.selectorLabels" -}}
app.kubernetes.io/name: {{ include "kubetune.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end }}

{{- define "kubetune.labels" -}}
helm.sh/chart: {{ include "kubetune.chart" . }}
{{ include "kubetune.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: kubetune
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{- define "kubetune.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "kubetune.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- required "serviceAccount.name must name an existing ServiceAccount when serviceAccount.create is false" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* repository:tag, or repository@digest when a digest is given; the tag defaults to appVersion. */}}
{{- define "kubetune.image" -}}
{{- $image := index . 0 }}
{{- $root := index . 1 }}
{{- if $image.digest }}
{{- printf "%s@%s" $image.repository $image.digest }}
{{- else }}
{{- printf "%s:%s" $image.repository (default $root.Chart.AppVersion $image.tag) }}
{{- end }}
{{- end }}

{{- define "kubetune.progressURL" -}}
{{- if .Values.operator.progressURL }}
{{- .Values.operator.progressURL | trimSuffix "/" }}
{{- else }}
{{- printf "http://%s.%s.svc:%d" (include "kubetune.fullname" .) .Release.Namespace (int .Values.operator.ports.progress) }}
{{- end }}
{{- end }}

{{/*
The operator's permissions in the namespaces it serves: exactly the verbs its code uses (every call is
in operator/kubetune_operator/kube.py, plus kopf's watching and patching; tests/chart/test_chart_rbac.py
compares these rules with the code). No wildcards. Children are never deleted by the operator: their
ownerReferences let Kubernetes' garbage collector remove them with the job.
*/}}
{{- define "kubetune.namespacedRules" -}}
# The jobs: listed and watched by kopf; read by the progress endpoint; deleted once
# ttlSecondsAfterFinished has passed. (kopf keeps its bookkeeping in the status, not in annotations.)
- apiGroups: ["kubetune.dev"]
  resources: ["finetunejobs"]
  verbs: ["get", "list", "watch", "delete"]
# Phase, conditions, progress and kopf's bookkeeping (status.kopf).
- apiGroups: ["kubetune.dev"]
  resources: ["finetunejobs/status"]
  verbs: ["patch"]
# Children carry ownerReferences with blockOwnerDeletion; where the API server enforces owner
# permissions (OwnerReferencesPermissionEnforcement, e.g. OpenShift) that needs this on the owner.
- apiGroups: ["kubetune.dev"]
  resources: ["finetunejobs/finalizers"]
  verbs: ["update"]
# The KubeRay RayJob each job runs as: created once, followed, and suspended/resumed by a patch.
- apiGroups: ["ray.io"]
  resources: ["rayjobs"]
  verbs: ["get", "list", "watch", "create", "patch"]
# The trainer pods' ServiceAccount, one per job namespace (trainer.serviceAccountName), whose projected
# tokens authenticate progress updates: get-or-create, never changed or deleted. (The trainer config
# travels in the RayJob.)
- apiGroups: [""]
  resources: ["serviceaccounts"]
  verbs: ["get", "create"]
# Each job's Ray token Secret (<job>-ray-token, owned by the job): created once, never read back unless
# the admin grants Secret reads (rbac-preflight-secrets.yaml). No list or watch, no get here.
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["create"]
# Preflight reads the ConfigMap named by spec.storage.caBundle (a private CA's certificates) to verify
# the S3 endpoint as the trainer will. Only get: the operator never enumerates ConfigMaps.
- apiGroups: [""]
  resources: ["configmaps"]
  verbs: ["get"]
# Each job's NetworkPolicy (<job>-ray, owned by the job): get-or-create, never changed or deleted.
- apiGroups: ["networking.k8s.io"]
  resources: ["networkpolicies"]
  verbs: ["get", "create"]
# Events on the jobs (kubectl describe ftj tells the story); kopf posts core/v1 Events.
- apiGroups: [""]
  resources: ["events"]
  verbs: ["create"]
{{- end }}

{{/* Cluster-scoped needs, whatever namespaces are served. */}}
{{- define "kubetune.clusterRules" -}}
# kopf watches the CRDs to notice resources appear (KubeRay installed after the operator). Whether
# KubeRay is installed is asked of API discovery, which needs no permission.
- apiGroups: ["apiextensions.k8s.io"]
  resources: ["customresourcedefinitions"]
  verbs: ["list", "watch"]
# The progress endpoint authenticates each trainer pod's ServiceAccount token with a TokenReview.
- apiGroups: ["authentication.k8s.io"]
  resources: ["tokenreviews"]
  verbs: ["create"]
{{- end }}

{{/*
Reading Secrets, granted apart from the rest and only where asked (rbac-preflight-secrets.yaml): preflight
reads the Secret a job names in spec.storage.credentialsSecret to check S3 before a Ray cluster starts.
Only `get`: no list or watch, so the operator never enumerates Secrets.
*/}}
{{- define "kubetune.preflightSecretRules" -}}
- apiGroups: [""]
  resources: ["secrets"]
  verbs: ["get"]
{{- end }}
