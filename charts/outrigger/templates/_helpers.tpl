{{/* Names and labels shared by every template. */}}

{{- define "outrigger.controller" -}}
outrigger-controller
{{- end }}

{{- define "outrigger.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end }}

{{- define "outrigger.selector" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/component: controller
{{- end }}

{{/* An image reference: registry/name:tag, the tag defaulting to the chart's appVersion. */}}
{{- define "outrigger.image" -}}
{{- $tag := .root.Values.image.tag | default .root.Chart.AppVersion -}}
{{ printf "%s/%s:%s" .root.Values.image.registry .name $tag }}
{{- end }}

{{/* The gRPC URL proxies reach the controller at. */}}
{{- define "outrigger.controlPlane" -}}
{{ printf "http://%s.%s.svc:%d" (include "outrigger.controller" .) .Release.Namespace (int .Values.controller.grpcPort) }}
{{- end }}

{{/* The Secret of the mesh's trust anchor and issuer: the user's, or the one the chart makes. */}}
{{- define "outrigger.identitySecret" -}}
{{ .Values.identity.issuerSecret | default (printf "%s-identity" (include "outrigger.controller" .)) }}
{{- end }}
