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

{{/* The environment variable holding an account's token: the shared CLOUDFLARE_API_TOKEN, or
     CLOUDFLARE_API_TOKEN_<NAME> for an account with a tokenSecret of its own.
     Called with (list $name $account). */}}
{{- define "purge-worker.tokenEnv" -}}
{{- $name := index . 0 }}
{{- $account := index . 1 }}
{{- if $account.tokenSecret }}
{{- printf "CLOUDFLARE_API_TOKEN_%s" (regexReplaceAll "[^A-Z0-9]" (upper $name) "_") }}
{{- else }}
{{- print "CLOUDFLARE_API_TOKEN" }}
{{- end }}
{{- end }}

{{/* True (non-empty) when some account reads the shared token. */}}
{{- define "purge-worker.usesSharedToken" -}}
{{- range $name, $account := .Values.cloudflare.accounts -}}
{{- if not $account.tokenSecret -}}yes{{- end -}}
{{- end -}}
{{- end }}

{{/* The image reference: a digest pins it and wins over the tag. */}}
{{- define "purge-worker.image" -}}
{{- if .Values.image.digest }}
{{- printf "%s@%s" .Values.image.repository .Values.image.digest }}
{{- else }}
{{- printf "%s:%s" .Values.image.repository (.Values.image.tag | default .Chart.AppVersion) }}
{{- end }}
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
{{- with .Values.kafka.tls.secretName }}
{{- $_ := set $sec "ssl_cafile" (printf "/etc/purge-worker/kafka-tls/%s" $.Values.kafka.tls.caKey) }}
{{- if $.Values.kafka.tls.certKey }}
{{- $_ := set $sec "ssl_certfile" (printf "/etc/purge-worker/kafka-tls/%s" $.Values.kafka.tls.certKey) }}
{{- $_ := set $sec "ssl_keyfile" (printf "/etc/purge-worker/kafka-tls/%s" $.Values.kafka.tls.keyKey) }}
{{- end }}
{{- end }}
{{- $_ := set $kafka "security" $sec }}
{{- $_ := set $kafka "budget_topic" .Values.kafka.budgetTopic }}
{{- $accounts := dict }}
{{- range $name, $account := .Values.cloudflare.accounts }}
{{- $env := include "purge-worker.tokenEnv" (list $name $account) }}
{{- $_ := set $accounts $name (merge (dict "token_env" $env) (omit $account "tokenSecret")) }}
{{- end }}
{{- $cf := dict "accounts" $accounts "zones" .Values.cloudflare.zones }}
{{- if .Values.cloudflare.baseUrl }}
{{- $_ := set $cf "base_url" .Values.cloudflare.baseUrl }}
{{- end }}
{{- $delivery := merge (dict "drain_deadline_seconds" .Values.drainDeadlineSeconds) (.Values.worker.delivery | default dict) }}
{{- $obs := dict "metrics_port" .Values.metrics.port "health_port" .Values.health.port "listen_address" "0.0.0.0" "log_format" "json" "log_level" .Values.worker.logLevel }}
{{- $config := dict "kafka" $kafka "cloudflare" $cf "coalesce" (.Values.worker.coalesce | default dict) "delivery" $delivery "warming" (.Values.worker.warming | default dict) "observability" $obs "rules_files" (list "/etc/purge-worker/rules/rules.yaml") }}
{{- toYaml $config }}
{{- end }}

{{/* The worker container's environment: tokens, the SASL password, extraEnv. Shared by the
     Deployment and the `helm test` pod, so the test checks what the pods run. */}}
{{- define "purge-worker.env" -}}
{{- if include "purge-worker.usesSharedToken" . }}
- name: CLOUDFLARE_API_TOKEN
  valueFrom:
    secretKeyRef:
      name: {{ include "purge-worker.secretName" . }}
      key: {{ .Values.secretKeys.apiToken }}
{{- end }}
{{- range $name, $account := .Values.cloudflare.accounts }}
{{- with $account.tokenSecret }}
# The {{ $name }} account's own token.
- name: {{ include "purge-worker.tokenEnv" (list $name $account) }}
  valueFrom:
    secretKeyRef:
      name: {{ .name }}
      key: {{ .key }}
{{- end }}
{{- end }}
{{- if .Values.kafka.security.saslMechanism }}
- name: KAFKA_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ include "purge-worker.secretName" . }}
      key: {{ .Values.secretKeys.kafkaPassword }}
{{- end }}
{{- with .Values.extraEnv }}
{{- toYaml . | nindent 0 }}
{{- end }}
{{- end }}

{{- define "purge-worker.volumeMounts" -}}
- name: config
  mountPath: /etc/purge-worker/config.yaml
  subPath: config.yaml
  readOnly: true
- name: rules
  mountPath: /etc/purge-worker/rules
  readOnly: true
- name: tmp
  mountPath: /tmp
{{- if .Values.kafka.tls.secretName }}
- name: kafka-tls
  mountPath: /etc/purge-worker/kafka-tls
  readOnly: true
{{- end }}
{{- with .Values.extraVolumeMounts }}
{{- toYaml . | nindent 0 }}
{{- end }}
{{- end }}

{{- define "purge-worker.volumes" -}}
- name: config
  configMap:
    name: {{ include "purge-worker.fullname" . }}
- name: rules
  configMap:
    name: {{ include "purge-worker.rulesConfigMap" . }}
- name: tmp
  emptyDir:
    sizeLimit: 64Mi
{{- with .Values.kafka.tls.secretName }}
- name: kafka-tls
  secret:
    secretName: {{ . }}
    defaultMode: 0440
{{- end }}
{{- with .Values.extraVolumes }}
{{- toYaml . | nindent 0 }}
{{- end }}
{{- end }}

{{/* The alert rules (a `groups:` list): the PrometheusRule's spec, and what `promtool check
     rules` checks in the tests. */}}
{{- define "purge-worker.alertGroups" -}}
groups:
  - name: purge-worker
    rules:
      - alert: PurgeWorkerStuck
        expr: |
          sum by (namespace) (purge_worker_consumer_lag{namespace="{{ .Release.Namespace }}"}) > 0
          and on (namespace)
          time() - max by (namespace) (purge_worker_last_record_timestamp_seconds{namespace="{{ .Release.Namespace }}"}) > {{ .Values.prometheusRule.stuckSeconds }}
        for: 5m
        labels:
          severity: critical
        annotations:
          summary: purge-worker has records waiting and finished none for {{ .Values.prometheusRule.stuckSeconds }} s
          description: Purges are not going out. Check the workers' logs, the API (api_requests_total by status) and the broker.
      - alert: PurgeWorkerPurgesLate
        expr: |
          histogram_quantile(0.99, sum by (le) (rate(purge_worker_event_age_seconds_bucket{namespace="{{ .Release.Namespace }}"}[5m]))) > {{ .Values.prometheusRule.eventAgeP99Seconds }}
        for: 10m
        labels:
          severity: warning
        annotations:
          summary: 1 % of purges are accepted more than {{ .Values.prometheusRule.eventAgeP99Seconds }} s after their change
          description: The budget may be the ceiling (rate_limiter_wait_seconds_total), or replicas are too few for the partitions.
      - alert: PurgeWorkerDeadLetters
        expr: |
          sum by (error_class) (increase(purge_worker_dead_letters_total{namespace="{{ .Release.Namespace }}"}[10m])) > 0
        labels:
          severity: warning
        annotations:
          summary: "records dead-lettered as {{ "{{" }} $labels.error_class {{ "}}" }}"
          description: api_rejected and unknown_zone usually mean a config or token problem, invalid_event a producer problem. Fix, then replay.
      - alert: PurgeWorkerRateLimited
        expr: |
          sum (increase(purge_worker_api_rate_limited_total{namespace="{{ .Release.Namespace }}"}[10m])) > 0
        labels:
          severity: warning
        annotations:
          summary: Cloudflare answered 429
          description: Something else spends the account's budget, or the configured plan is higher than the account's.
      - alert: PurgeWorkerCapRejected
        expr: |
          sum (increase(purge_worker_api_cap_rejected_total{namespace="{{ .Release.Namespace }}"}[10m])) > 0
        labels:
          severity: warning
        annotations:
          summary: Cloudflare refused a batch as too large
          description: The per-request cap is lower than configured; set files_per_request or items_per_request for the account.
      - alert: PurgeWorkerNotPolling
        expr: |
          time() - max by (pod) (purge_worker_last_poll_timestamp_seconds{namespace="{{ .Release.Namespace }}"}) > 60
        for: 2m
        labels:
          severity: critical
        annotations:
          summary: "{{ "{{" }} $labels.pod {{ "}}" }} has not polled Kafka for a minute"
          description: The loop is stuck or Kafka is unreachable; /healthz restarts a stuck pod, /readyz marks it unready.
      - alert: PurgeWorkerPurgeMissed
        expr: |
          sum by (zone) (increase(purge_worker_warm_hit_after_purge_total{namespace="{{ .Release.Namespace }}"}[10m])) > 0
        labels:
          severity: warning
        annotations:
          summary: "A page in {{ "{{" }} $labels.zone {{ "}}" }} was still cached right after its purge"
          description: Warming fetched a purged URL and got HIT; the rule's URLs, tags or cache-key headers do not match what the zone caches (see the worker's warning logs).
{{- end }}
