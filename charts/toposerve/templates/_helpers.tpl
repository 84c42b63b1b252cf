{{/* Names and labels shared by every template. */}}
{{- define "toposerve.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "toposerve.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "toposerve.selectorLabels" -}}
app.kubernetes.io/name: {{ include "toposerve.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: operator
{{- end -}}

{{- define "toposerve.labels" -}}
{{ include "toposerve.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: toposerve
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{- define "toposerve.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default (include "toposerve.fullname" .) .Values.serviceAccount.name -}}
{{- else -}}
{{- default "default" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{/* The project image: repository@digest, else repository:tag (tag defaults to appVersion). */}}
{{- define "toposerve.image" -}}
{{- if .Values.image.digest -}}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest -}}
{{- else -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) -}}
{{- end -}}
{{- end -}}

{{/* operatorConfig verbatim, with toposerveImage defaulting to this chart's image and, with the
chart's gateway on, gatewayNamespace / gatewayService to where it runs: the autoscaler reads its
pods there, and gateway-mode InferencePools name its Service as their endpoint picker. */}}
{{- define "toposerve.operatorConfig" -}}
{{- $cfg := deepCopy (default (dict) .Values.operatorConfig) -}}
{{- if not (hasKey $cfg "toposerveImage") -}}
{{- $_ := set $cfg "toposerveImage" (include "toposerve.image" .) -}}
{{- end -}}
{{- if .Values.gateway.enabled -}}
{{- if not (hasKey $cfg "gatewayNamespace") -}}
{{- $_ := set $cfg "gatewayNamespace" .Release.Namespace -}}
{{- end -}}
{{- if not (hasKey $cfg "gatewayService") -}}
{{- $_ := set $cfg "gatewayService" (printf "%s-gateway" (include "toposerve.fullname" .)) -}}
{{- end -}}
{{- end -}}
{{- toYaml $cfg -}}
{{- end -}}

{{/* The restricted PodSecurity profile for a container. */}}
{{- define "toposerve.containerSecurityContext" -}}
allowPrivilegeEscalation: false
readOnlyRootFilesystem: true
runAsNonRoot: true
capabilities:
  drop: [ALL]
seccompProfile:
  type: RuntimeDefault
{{- end -}}
