{{/* Names and labels shared by the templates. */}}

{{- define "tokengo.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{/* Name of cluster-scoped objects (ClusterRoles, ClusterRoleBindings): the release namespace
comes first, so two releases of the same name in two namespaces never collide. */}}
{{- define "tokengo.clusterName" -}}
{{- printf "%s-%s" .Release.Namespace (include "tokengo.fullname" .) | trunc 240 | trimSuffix "-" -}}
{{- end -}}

{{- define "tokengo.serviceAccountName" -}}
{{- default (include "tokengo.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "tokengo.selectorLabels" -}}
app.kubernetes.io/name: tokengo-operator
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "tokengo.labels" -}}
{{ include "tokengo.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "tokengo.image" -}}
{{- printf "%s:%s" .repository (default $.appVersion .tag) -}}
{{- end -}}

{{/* The imagePullSecrets' names, comma-separated (what the operator passes to node pods). */}}
{{- define "tokengo.pullSecretNames" -}}
{{- $names := list -}}
{{- range .Values.imagePullSecrets -}}
{{- $names = append $names .name -}}
{{- end -}}
{{- join "," $names -}}
{{- end -}}
