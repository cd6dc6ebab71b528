{{/* The chart's name. */}}
{{- define "jobcachefs.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* The release's full name, the prefix of every namespaced and cluster-scoped object. */}}
{{- define "jobcachefs.fullname" -}}
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

{{- define "jobcachefs.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{/* Labels of every object. */}}
{{- define "jobcachefs.labels" -}}
helm.sh/chart: {{ include "jobcachefs.chart" . }}
{{ include "jobcachefs.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: jobcachefs
{{- end }}

{{/* Labels that select the node plugin's pods; never change them on upgrade. */}}
{{- define "jobcachefs.selectorLabels" -}}
app.kubernetes.io/name: {{ include "jobcachefs.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "jobcachefs.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "jobcachefs.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{/* The CSI plugin name, compiled into the driver: not configurable. */}}
{{- define "jobcachefs.driverName" -}}
jobcachefs.dev
{{- end }}

{{/* kubelet's directory on the nodes, without a trailing slash. */}}
{{- define "jobcachefs.kubeletDir" -}}
{{- required "kubeletDir must be set" .Values.kubeletDir | trimSuffix "/" }}
{{- end }}

{{/* The directory on the node that holds the driver's socket. */}}
{{- define "jobcachefs.socketDir" -}}
{{- printf "%s/plugins/%s" (include "jobcachefs.kubeletDir" .) (include "jobcachefs.driverName" .) }}
{{- end }}

{{- define "jobcachefs.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* An image reference from {repository, tag}. */}}
{{- define "jobcachefs.sidecarImage" -}}
{{- printf "%s:%s" .repository .tag }}
{{- end }}

{{/* Whether a shared directory is configured; fails when both kinds are set. */}}
{{- define "jobcachefs.sharedEnabled" -}}
{{- $s := .Values.sharedDir | default dict }}
{{- if and $s.hostPath $s.existingClaim }}
{{- fail "sharedDir: set hostPath or existingClaim, not both" }}
{{- end }}
{{- if or $s.hostPath $s.existingClaim }}true{{ end }}
{{- end }}

{{/* The lock backend, checked. */}}
{{- define "jobcachefs.lock" -}}
{{- if not (has .Values.lock (list "file" "lease")) }}
{{- fail (printf "lock must be \"file\" or \"lease\", not %q" (toString .Values.lock)) }}
{{- end }}
{{- .Values.lock }}
{{- end }}

{{/* "true" when caches are shared through a registry (registry.url), else empty; checked
against lock, sharedDir and the CA bundle. */}}
{{- define "jobcachefs.registry" -}}
{{- $r := .Values.registry | default dict }}
{{- if $r.url }}
{{- if contains "://" (toString $r.url) }}
{{- fail (printf "registry.url is REGISTRY/PREFIX without a scheme, not %q (registry.insecure=true for plain HTTP)" (toString $r.url)) }}
{{- end }}
{{- if include "jobcachefs.sharedEnabled" . }}
{{- fail "registry.url and sharedDir (hostPath or existingClaim) are two ways to share caches: set one" }}
{{- end }}
{{- if ne (include "jobcachefs.lock" .) "lease" }}
{{- fail (printf "registry.url needs lock: lease, not %q: nodes that share caches through a registry must never publish one cache at once" (include "jobcachefs.lock" .)) }}
{{- end }}
{{- if and $r.caBundle (not (contains "-----BEGIN CERTIFICATE-----" (toString $r.caBundle))) }}
{{- fail "registry.caBundle must be PEM text (-----BEGIN CERTIFICATE-----...), not base64 or a file name: --set-file registry.caBundle=ca.pem" }}
{{- end }}
{{- true }}
{{- end }}
{{- end }}

{{/* The driver's metrics port when metrics are enabled, else empty; checked against healthPort. */}}
{{- define "jobcachefs.metricsPort" -}}
{{- $m := .Values.metrics | default dict }}
{{- if $m.enabled }}
{{- if eq (int $m.port) (int .Values.healthPort) }}
{{- fail (printf "metrics.port and healthPort must differ: both are %d" (int $m.port)) }}
{{- end }}
{{- int $m.port }}
{{- end }}
{{- end }}

{{/* "true" when storage capacity tracking is on, else empty. */}}
{{- define "jobcachefs.storageCapacity" -}}
{{- $c := .Values.storageCapacity | default dict }}
{{- if $c.enabled }}true{{ end }}
{{- end }}

{{/* "true" when CSI snapshots are on, else empty. */}}
{{- define "jobcachefs.snapshots" -}}
{{- $s := .Values.snapshots | default dict }}
{{- if $s.enabled }}true{{ end }}
{{- end }}

{{/* The name of the chart's VolumeSnapshotClass. */}}
{{- define "jobcachefs.volumeSnapshotClassName" -}}
{{- $s := .Values.snapshots | default dict }}
{{- $c := $s.volumeSnapshotClass | default dict }}
{{- required "snapshots.volumeSnapshotClass.name must be set" $c.name }}
{{- end }}

{{/* The driver's --capacity-reserve. */}}
{{- define "jobcachefs.capacityReserve" -}}
{{- $r := .Values.capacityReserve }}
{{- if kindIs "invalid" $r }}{{ fail "capacityReserve must be set (a size such as 1GiB, or 0)" }}{{ end }}
{{- if kindIs "float64" $r }}{{ printf "%.0f" $r }}{{ else }}{{ toString $r }}{{ end }}
{{- end }}
