{{/* Names and labels shared by the templates. */}}

{{- define "tokengo.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
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
