{{/* Chart name, truncated to the 63 characters Kubernetes names allow. */}}
{{- define "purge-worker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Fully qualified app name: release-chart unless the release name already contains it. */}}
{{- define "purge-worker.fullname" -}}
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

{{- define "purge-worker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "purge-worker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "purge-worker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "purge-worker.labels" -}}
helm.sh/chart: {{ include "purge-worker.chart" . }}
{{ include "purge-worker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/component: worker
{{- end }}

{{- define "purge-worker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "purge-worker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "purge-worker.secretName" -}}
{{- default (include "purge-worker.fullname" .) .Values.existingSecret }}
{{- end }}

{{- define "purge-worker.rulesConfigMap" -}}
{{- default (printf "%s-rules" (include "purge-worker.fullname" .)) .Values.existingRulesConfigMap }}
{{- end }}

{{/* The worker's config file. Rules live in their own file, so they can come from elsewhere. */}}
{{- define "purge-worker.config" -}}
{{- $kafka := dict "bootstrap_servers" .Values.kafka.bootstrapServers "topics" .Values.kafka.topics "group_id" .Values.kafka.groupId "dead_letter_topic" .Values.kafka.deadLetterTopic }}
{{- $sec := dict "protocol" .Values.kafka.security.protocol }}
{{- if .Values.kafka.security.saslMechanism }}
{{- $_ := set $sec "sasl_mechanism" .Values.kafka.security.saslMechanism }}
{{- $_ := set $sec "sasl_username" .Values.kafka.security.saslUsername }}
{{- $_ := set $sec "sasl_password_env" "KAFKA_PASSWORD" }}
{{- end }}
{{- $_ := set $kafka "security" $sec }}
{{- $accounts := dict }}
{{- range $name, $account := .Values.cloudflare.accounts }}
{{- $_ := set $accounts $name (merge (dict "token_env" "CLOUDFLARE_API_TOKEN") (omit $account "tokenEnv")) }}
{{- end }}
{{- $cf := dict "accounts" $accounts "zones" .Values.cloudflare.zones }}
{{- if .Values.cloudflare.baseUrl }}
{{- $_ := set $cf "base_url" .Values.cloudflare.baseUrl }}
{{- end }}
{{- $delivery := merge (dict "drain_deadline_seconds" .Values.drainDeadlineSeconds) (.Values.worker.delivery | default dict) }}
{{- $obs := dict "metrics_port" .Values.metrics.port "health_port" .Values.health.port "listen_address" "0.0.0.0" "log_format" "json" "log_level" .Values.worker.logLevel }}
{{- $config := dict "kafka" $kafka "cloudflare" $cf "coalesce" (.Values.worker.coalesce | default dict) "delivery" $delivery "observability" $obs "rules_files" (list "/etc/purge-worker/rules/rules.yaml") }}
{{- toYaml $config }}
{{- end }}
