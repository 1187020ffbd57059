{{- define "gpu-provisioner.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{- define "gpu-provisioner.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- $name := include "gpu-provisioner.name" . -}}
{{- if contains $name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name $name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}
{{- end -}}

{{/* Labels of every object; the selector labels are the only ones that never change across upgrades. */}}
{{- define "gpu-provisioner.labels" -}}
{{ include "gpu-provisioner.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- with .Values.additionalLabels }}
{{ toYaml . }}
{{- end -}}
{{- end -}}

{{- define "gpu-provisioner.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gpu-provisioner.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* metadata.labels and, when there are any, metadata.annotations of an object (indented under metadata). */}}
{{- define "gpu-provisioner.metadata" -}}
labels:
  {{- include "gpu-provisioner.labels" . | nindent 2 }}
{{- with .Values.additionalAnnotations }}
annotations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{- define "gpu-provisioner.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- default "gpu-provisioner" .Values.serviceAccount.name -}}
{{- else -}}
{{- required "serviceAccount.name is required when serviceAccount.create is false" .Values.serviceAccount.name -}}
{{- end -}}
{{- end -}}

{{- define "gpu-provisioner.image" -}}
{{- $image := .Values.controller.image -}}
{{- $reference := printf "%s:%s" $image.repository (toString (default .Chart.AppVersion $image.tag)) -}}
{{- if $image.digest -}}
{{- printf "%s@%s" $reference $image.digest -}}
{{- else -}}
{{- $reference -}}
{{- end -}}
{{- end -}}

{{/* The value controller.env gives the variable .name, or .default when it gives none. */}}
{{- define "gpu-provisioner.envOr" -}}
{{- $value := .default -}}
{{- range .env -}}
{{- if and (eq .name $.name) (not (kindIs "invalid" .value)) -}}{{- $value = .value -}}{{- end -}}
{{- end -}}
{{- $value -}}
{{- end -}}

{{/* "true" when leader election is on: controller.env's LEADER_ELECT wins over leaderElection.enabled. */}}
{{- define "gpu-provisioner.leaderElect" -}}
{{- $value := include "gpu-provisioner.envOr" (dict "env" .Values.controller.env "name" "LEADER_ELECT" "default" .Values.leaderElection.enabled) -}}
{{- has (lower $value) (list "true" "1" "yes" "on" "t" "y") -}}
{{- end -}}

{{- define "gpu-provisioner.metricsPort" -}}
{{- include "gpu-provisioner.envOr" (dict "env" .Values.controller.env "name" "METRICS_PORT" "default" .Values.controller.metrics.port) -}}
{{- end -}}

{{- define "gpu-provisioner.healthProbePort" -}}
{{- include "gpu-provisioner.envOr" (dict "env" .Values.controller.env "name" "HEALTH_PROBE_PORT" "default" .Values.controller.healthProbe.port) -}}
{{- end -}}

{{/* The variables the chart sets, as a YAML list; controller.env entries of the same name replace them. */}}
{{- define "gpu-provisioner.chartEnv" -}}
{{- $env := list -}}
{{- with .Values.settings.azure.clusterName }}{{ $env = append $env (dict "name" "AZURE_CLUSTER_NAME" "value" (toString .)) }}{{ end -}}
{{- with .Values.workloadIdentity.clientId }}{{ $env = append $env (dict "name" "AZURE_CLIENT_ID" "value" (toString .)) }}{{ end -}}
{{- with .Values.workloadIdentity.tenantId }}{{ $env = append $env (dict "name" "AZURE_TENANT_ID" "value" (toString .)) }}{{ end -}}
{{- with .Values.bindAddress }}{{ $env = append $env (dict "name" "BIND_ADDRESS" "value" (toString .)) }}{{ end -}}
{{- $settings := .Values.settings -}}
{{- $env = append $env (dict "name" "CLAIM_APIS" "value" (join "," $settings.claimAPIs)) -}}
{{- $env = append $env (dict "name" "LAUNCH_TIMEOUT_SECONDS" "value" (toString $settings.launchTimeoutSeconds)) -}}
{{- $env = append $env (dict "name" "REGISTRATION_TIMEOUT_SECONDS" "value" (toString $settings.registrationTimeoutSeconds)) -}}
{{- $env = append $env (dict "name" "POOL_REFRESH_INTERVAL_SECONDS" "value" (toString $settings.poolRefreshIntervalSeconds)) -}}
{{- $env = append $env (dict "name" "ORPHAN_GRACE_SECONDS" "value" (toString $settings.orphanGraceSeconds)) -}}
{{- $env = append $env (dict "name" "INITIALIZATION_TIMEOUT_SECONDS" "value" (toString $settings.initializationTimeoutSeconds)) -}}
{{- $env = append $env (dict "name" "NODE_REPAIR_ENABLED" "value" (toString $settings.nodeRepair.enabled)) -}}
{{- $env = append $env (dict "name" "NODE_REPAIR_TOLERATION_SECONDS" "value" (toString $settings.nodeRepair.tolerationSeconds)) -}}
{{- $env = append $env (dict "name" "NODE_REPAIR_MAX_UNHEALTHY_PERCENT" "value" (toString $settings.nodeRepair.maxUnhealthyPercent)) -}}
{{- $env = append $env (dict "name" "LEADER_ELECT" "value" (toString .Values.leaderElection.enabled)) -}}
{{- $env = append $env (dict "name" "METRICS_PORT" "value" (toString .Values.controller.metrics.port)) -}}
{{- $env = append $env (dict "name" "HEALTH_PROBE_PORT" "value" (toString .Values.controller.healthProbe.port)) -}}
{{- $env = append $env (dict "name" "LOG_LEVEL" "value" (default .Values.logLevel .Values.controller.logLevel)) -}}
{{- $env = append $env (dict "name" "POD_NAMESPACE" "valueFrom" (dict "fieldRef" (dict "fieldPath" "metadata.namespace"))) -}}
{{- $env = append $env (dict "name" "POD_NAME" "valueFrom" (dict "fieldRef" (dict "fieldPath" "metadata.name"))) -}}
{{- $userNames := list -}}
{{- range .Values.controller.env }}{{ $userNames = append $userNames .name }}{{ end -}}
{{- $kept := list -}}
{{- range $env }}{{ if not (has .name $userNames) }}{{ $kept = append $kept . }}{{ end }}{{ end -}}
{{- toYaml $kept -}}
{{- end -}}

{{/* Gives each pod (anti-)affinity term and spread constraint without a labelSelector one that selects this
release's pods (the values cannot know the release name). Works on a copy of the values. */}}
{{- define "gpu-provisioner.withPodSelector" -}}
{{- $selector := dict "matchLabels" (include "gpu-provisioner.selectorLabels" .root | fromYaml) -}}
{{- range .terms -}}
{{- if not (hasKey . "labelSelector") }}{{ $_ := set . "labelSelector" $selector }}{{ end -}}
{{- end -}}
{{- end -}}

{{- define "gpu-provisioner.affinity" -}}
{{- $affinity := deepCopy .Values.affinity -}}
{{- range $kind := list "podAffinity" "podAntiAffinity" -}}
{{- with get $affinity $kind -}}
{{- $terms := get . "requiredDuringSchedulingIgnoredDuringExecution" | default list -}}
{{- range get . "preferredDuringSchedulingIgnoredDuringExecution" | default list }}{{ $terms = append $terms .podAffinityTerm }}{{ end -}}
{{- include "gpu-provisioner.withPodSelector" (dict "root" $ "terms" $terms) -}}
{{- end -}}
{{- end -}}
{{- toYaml $affinity -}}
{{- end -}}

{{- define "gpu-provisioner.topologySpreadConstraints" -}}
{{- $constraints := deepCopy .Values.topologySpreadConstraints -}}
{{- include "gpu-provisioner.withPodSelector" (dict "root" . "terms" $constraints) -}}
{{- toYaml $constraints -}}
{{- end -}}
