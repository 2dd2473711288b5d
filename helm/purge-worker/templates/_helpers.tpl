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
{{- if $.Values.kafka.tls.keyPasswordKey }}
{{- $_ := set $sec "ssl_password_env" "KAFKA_SSL_KEY_PASSWORD" }}
{{- end }}
{{- end }}
{{- end }}
{{- $_ := set $kafka "security" $sec }}
{{- $_ := set $kafka "budget_topic" .Values.kafka.budgetTopic }}
{{- $_ := set $kafka "receipts_topic" .Values.kafka.receiptsTopic }}
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
# Read by KEDA's TriggerAuthentication (the worker takes it from its config file).
- name: KAFKA_USERNAME
  value: {{ .Values.kafka.security.saslUsername | quote }}
{{- end }}
{{- if and .Values.kafka.tls.secretName .Values.kafka.tls.keyPasswordKey }}
- name: KAFKA_SSL_KEY_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .Values.kafka.tls.secretName }}
      key: {{ .Values.kafka.tls.keyPasswordKey }}
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

{{/* What the alerts and the dashboard select this release's series by: the namespace, and the
     job a ServiceMonitor scraping the metrics Service gives them (the Service's name). */}}
{{- define "purge-worker.job" -}}
{{- printf "%s-metrics" (include "purge-worker.fullname" .) }}
{{- end }}

{{- define "purge-worker.ruleSelector" -}}
{namespace="{{ .Release.Namespace }}", job="{{ include "purge-worker.job" . }}"}
{{- end }}

{{/* The alert rules (a `groups:` list): the PrometheusRule's spec, and what `promtool` checks
     and unit-tests in the tests. */}}
{{- define "purge-worker.alertGroups" -}}
groups:
  - name: purge-worker
    rules:
      - alert: PurgeWorkerStuck
        expr: |
          sum by (namespace, job) (purge_worker_consumer_lag{{ include "purge-worker.ruleSelector" . }}) > 0
          and on (namespace, job)
          time() - max by (namespace, job) (purge_worker_last_record_timestamp_seconds{{ include "purge-worker.ruleSelector" . }}) > {{ .Values.prometheusRule.stuckSeconds }}
        for: 5m
        labels:
          severity: critical
        annotations:
          summary: purge-worker has records waiting and finished none for {{ .Values.prometheusRule.stuckSeconds }} s
          description: Purges are not going out. Check the workers' logs, the API (api_requests_total by status) and the broker.
      - alert: PurgeWorkerPurgesLate
        expr: |
          histogram_quantile(0.99, sum by (le) (rate(purge_worker_event_age_seconds_bucket{{ include "purge-worker.ruleSelector" . }}[5m]))) > {{ .Values.prometheusRule.eventAgeP99Seconds }}
        for: 10m
        labels:
          severity: warning
        annotations:
          summary: 1 % of purges are accepted more than {{ .Values.prometheusRule.eventAgeP99Seconds }} s after their change
          description: The budget may be the ceiling (rate_limiter_wait_seconds_total), or replicas are too few for the partitions.
      - alert: PurgeWorkerDeadLetters
        expr: |
          sum by (error_class) (increase(purge_worker_dead_letters_total{{ include "purge-worker.ruleSelector" . }}[10m])) > 0
        labels:
          severity: warning
        annotations:
          summary: "records dead-lettered as {{ "{{" }} $labels.error_class {{ "}}" }}"
          description: api_rejected and unknown_zone usually mean a config or token problem, invalid_event a producer problem. Fix, then replay.
      - alert: PurgeWorkerRateLimited
        expr: |
          sum (increase(purge_worker_api_rate_limited_total{{ include "purge-worker.ruleSelector" . }}[10m])) > 0
        labels:
          severity: warning
        annotations:
          summary: Cloudflare answered 429
          description: Something else spends the account's budget, or the configured plan is higher than the account's.
      - alert: PurgeWorkerCapRejected
        expr: |
          sum (increase(purge_worker_api_cap_rejected_total{{ include "purge-worker.ruleSelector" . }}[10m])) > 0
        labels:
          severity: warning
        annotations:
          summary: Cloudflare refused a batch as too large
          description: The per-request cap is lower than configured; set files_per_request or items_per_request for the account.
      - alert: PurgeWorkerNotPolling
        expr: |
          time() - max by (pod) (purge_worker_last_poll_timestamp_seconds{{ include "purge-worker.ruleSelector" . }}) > 60
        for: 2m
        labels:
          severity: critical
        annotations:
          summary: "{{ "{{" }} $labels.pod {{ "}}" }} has not polled Kafka for a minute"
          description: The loop is stuck or Kafka is unreachable; /healthz restarts a stuck pod, /readyz marks it unready.
      - alert: PurgeWorkerAbsent
        expr: |
          absent(up{{ include "purge-worker.ruleSelector" . }})
        for: {{ .Values.prometheusRule.downForSeconds }}s
        labels:
          severity: critical
        annotations:
          summary: No purge-worker of {{ include "purge-worker.job" . }} is scraped
          description: Prometheus finds no target for the release's metrics Service (no pods, or the ServiceMonitor does not select it); every other alert is blind meanwhile.
      - alert: PurgeWorkerDown
        expr: |
          max by (namespace, job) (up{{ include "purge-worker.ruleSelector" . }}) == 0
        for: {{ .Values.prometheusRule.downForSeconds }}s
        labels:
          severity: critical
        annotations:
          summary: Every purge-worker of {{ include "purge-worker.job" . }} is down or unscrapable
          description: The pods run but their metrics cannot be read (crash loop, NetworkPolicy, port); purges are probably not going out.
      - alert: PurgeWorkerPurgeMissed
        expr: |
          sum by (zone) (increase(purge_worker_warm_hit_after_purge_total{{ include "purge-worker.ruleSelector" . }}[10m])) > 0
        labels:
          severity: warning
        annotations:
          summary: "A page in {{ "{{" }} $labels.zone {{ "}}" }} was still cached right after its purge"
          description: Warming fetched a purged URL and got HIT; the rule's URLs, tags or cache-key headers do not match what the zone caches (see the worker's warning logs).
      - alert: PurgeWorkerReceiptsLost
        expr: |
          sum by (namespace, job) (increase(purge_worker_receipts_total{{ include "purge-worker.ruleSelector" . | trimSuffix "}" }}, outcome=~"failed|dropped"}[10m])) > 0
        for: 15m
        labels:
          severity: warning
        annotations:
          summary: Receipts have not been written for 15 minutes
          description: Purges go on, but trace cannot answer for them and a restart or a handover purges again what was purged. The workers' warning names the cause (a missing topic, a missing Write ACL, the broker).
{{- end }}

{{/* Values that would render but could not run: each a failure naming the key and the fix. The
     schema checks types and shapes; this checks how values go together. */}}
{{- define "purge-worker.validate" -}}
{{- $v := .Values }}
{{- if hasKey ($v.worker.delivery | default dict) "drain_deadline_seconds" }}
{{- fail "set drainDeadlineSeconds, not worker.delivery.drain_deadline_seconds: the pod's termination grace period is derived from it" }}
{{- end }}
{{- if and $v.autoscaling.enabled $v.keda.enabled }}
{{- fail "autoscaling.enabled and keda.enabled both scale the Deployment: enable only one" }}
{{- end }}
{{- $sec := $v.kafka.security }}
{{- $sasl := hasPrefix "SASL_" $sec.protocol }}
{{- $tls := has $sec.protocol (list "SSL" "SASL_SSL") }}
{{- if and $sasl (not $sec.saslMechanism) }}
{{- fail (printf "kafka.security.protocol %s needs kafka.security.saslMechanism" $sec.protocol) }}
{{- end }}
{{- if and (not $sasl) $sec.saslMechanism }}
{{- fail (printf "kafka.security.saslMechanism is set, but protocol %s sends no SASL credentials: use SASL_SSL" $sec.protocol) }}
{{- end }}
{{- if and $sasl (not $sec.saslUsername) }}
{{- fail "kafka.security.saslUsername is required with a SASL mechanism" }}
{{- end }}
{{- if and $v.kafka.tls.secretName (not $tls) }}
{{- fail (printf "kafka.tls.secretName mounts TLS files, but protocol %s does not use TLS: use SSL or SASL_SSL" $sec.protocol) }}
{{- end }}
{{- if and $v.kafka.tls.certKey (not $v.kafka.tls.keyKey) }}
{{- fail "kafka.tls.certKey needs kafka.tls.keyKey: a client certificate is no use without its key" }}
{{- end }}
{{- if and $v.kafka.tls.keyPasswordKey (not $v.kafka.tls.keyKey) }}
{{- fail "kafka.tls.keyPasswordKey is the passphrase of kafka.tls.keyKey, which is not set" }}
{{- end }}
{{- $envs := dict }}
{{- range $name, $account := $v.cloudflare.accounts }}
{{- if $account.tokenSecret }}
{{- $env := include "purge-worker.tokenEnv" (list $name $account) }}
{{- if hasKey $envs $env }}
{{- fail (printf "cloudflare.accounts: %s and %s would both read their token from %s: rename one" (get $envs $env) $name $env) }}
{{- end }}
{{- $_ := set $envs $env $name }}
{{- end }}
{{- if and $v.kafka.budgetTopic (not $account.account_id) }}
{{- fail (printf "cloudflare.accounts.%s.account_id is required with kafka.budgetTopic: the workers share the account's budget by it (keyed on the token, a rotated token would split it); use Cloudflare's account id" $name) }}
{{- end }}
{{- end }}
{{- $accounts := keys $v.cloudflare.accounts | sortAlpha }}
{{- range $i, $zone := $v.cloudflare.zones }}
{{- if and $zone.account (not (has $zone.account $accounts)) }}
{{- fail (printf "cloudflare.zones[%d].account: %s is not one of the accounts (%s)" $i $zone.account (join ", " $accounts)) }}
{{- end }}
{{- if and (not $zone.account) (gt (len $accounts) 1) }}
{{- fail (printf "cloudflare.zones[%d].account is required: %d accounts are configured" $i (len $accounts)) }}
{{- end }}
{{- end }}
{{- end }}
