{{/* Namespace of every namespaced object: the release's unless .Values.namespace names one. */}}
{{- define "packet-capture.namespace" -}}
{{- .Values.namespace | default .Release.Namespace -}}
{{- end }}

{{/* Labels every object carries. */}}
{{- define "packet-capture.labels" -}}
app.kubernetes.io/name: packet-capture
{{ include "packet-capture.commonLabels" . }}
{{- end }}

{{/* The labels that are not in a selector. */}}
{{- define "packet-capture.commonLabels" -}}
{{ include "packet-capture.podCommonLabels" . }}
helm.sh/chart: {{ .Chart.Name }}-{{ .Chart.Version | replace "+" "_" }}
{{- end }}

{{/* Those of a pod template: not the chart's version, whose change alone
would roll every agent and fail the captures running there. */}}
{{- define "packet-capture.podCommonLabels" -}}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/part-of: packet-capture
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- end }}

{{/* Selector of the controller's pods (immutable). */}}
{{- define "packet-capture.controller.selector" -}}
app: packet-capture-controller
app.kubernetes.io/name: packet-capture
{{- end }}

{{/* Selector of the agents' pods (immutable); the controller finds agents by app=packet-capture-agent. */}}
{{- define "packet-capture.agent.selector" -}}
app: packet-capture-agent
app.kubernetes.io/name: packet-capture
{{- end }}

{{- define "packet-capture.controller.labels" -}}
{{ include "packet-capture.commonLabels" . }}
{{ include "packet-capture.controller.selector" . }}
app.kubernetes.io/component: controller
{{- end }}

{{- define "packet-capture.agent.labels" -}}
{{ include "packet-capture.commonLabels" . }}
{{ include "packet-capture.agent.selector" . }}
app.kubernetes.io/component: agent
{{- end }}

{{/* A pod template's labels; call with (dict "root" $ "component" "agent"). */}}
{{- define "packet-capture.podLabels" -}}
{{ include "packet-capture.podCommonLabels" .root }}
{{ include (printf "packet-capture.%s.selector" .component) .root }}
app.kubernetes.io/component: {{ .component }}
{{- end }}

{{- define "packet-capture.webhook.labels" -}}
{{ include "packet-capture.labels" . }}
app.kubernetes.io/component: webhook
{{- end }}

{{/* <registry>/<repository>:<tag>; call with (dict "root" $ "image" .Values.agent.image). */}}
{{- define "packet-capture.image" -}}
{{- $tag := .image.tag | default .root.Values.image.tag | default .root.Chart.AppVersion -}}
{{- printf "%s/%s:%s" (trimSuffix "/" .root.Values.image.registry) .image.repository $tag -}}
{{- end }}

{{/* Where the controller gets the webhook's serving certificate (its
--webhook-certs): cert-manager's Secret, the user's Secret (webhook.caBundle
given), or its own CA (neither). */}}
{{- define "packet-capture.webhook.certs" -}}
{{- if .Values.certManager.enabled -}}
cert-manager
{{- else if .Values.webhook.caBundle -}}
secret
{{- else -}}
self-managed
{{- end -}}
{{- end }}

{{/* Where the agents' CA comes from (the controller's --agent-ca): a CA
cert-manager keeps in the Secret packet-capture-agent-ca, or the
controller's own. */}}
{{- define "packet-capture.agentCa" -}}
{{- if .Values.certManager.enabled -}}
secret
{{- else -}}
self-managed
{{- end -}}
{{- end }}

{{/* The Secret of the controller's own CA (self-managed certificates). */}}
{{- define "packet-capture.caSecret" -}}
packet-capture-ca
{{- end }}

{{/* The webhook's certificate: cert-manager's Certificate name. */}}
{{- define "packet-capture.webhook.certificate" -}}
packet-capture-webhook
{{- end }}

{{/* The hash of the settings a component reads when it starts, for its
pods' checksum/config annotation: a change to one of them rolls the pods,
a change to anything else does not (LOG_LEVEL, which they apply while they
run; the keys the component does not read). Call with (dict "root" $
"keys" (list "AGENT_PORT" ...)). */}}
{{- define "packet-capture.configChecksum" -}}
{{- $data := (include (print .root.Template.BasePath "/config.yaml") .root | fromYaml).data -}}
{{- $read := dict -}}
{{- range .keys -}}
{{- if not (hasKey $data .) -}}
{{- fail (printf "packet-capture.configChecksum: the ConfigMap has no key %s" .) -}}
{{- end -}}
{{- $_ := set $read . (get $data .) -}}
{{- end -}}
{{- toJson $read | sha256sum -}}
{{- end }}
