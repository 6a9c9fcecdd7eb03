{{/* Chart name, truncated for label values. */}}
{{- define "csi-nbd.name" -}}
{{- .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}

{{/* Base name of the release's objects. */}}
{{- define "csi-nbd.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 50 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 50 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "csi-nbd.labels" -}}
app.kubernetes.io/name: {{ include "csi-nbd.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" }}
{{- end -}}

{{/* Selector labels of one component (controller or node): pass (list $ "controller"). */}}
{{- define "csi-nbd.selectorLabels" -}}
{{- $ := index . 0 -}}
app.kubernetes.io/name: {{ include "csi-nbd.name" $ }}
app.kubernetes.io/instance: {{ $.Release.Name }}
app.kubernetes.io/component: {{ index . 1 }}
{{- end -}}

{{- define "csi-nbd.controllerServiceAccount" -}}
{{- default (printf "%s-controller" (include "csi-nbd.fullname" .)) .Values.serviceAccount.controller -}}
{{- end -}}

{{- define "csi-nbd.nodeServiceAccount" -}}
{{- default (printf "%s-node" (include "csi-nbd.fullname" .)) .Values.serviceAccount.node -}}
{{- end -}}

{{/* An image reference from {repository, tag}: pass (list $ .image). */}}
{{- define "csi-nbd.image" -}}
{{- $ := index . 0 -}}
{{- $img := index . 1 -}}
{{- printf "%s:%s" $img.repository (default $.Chart.AppVersion $img.tag) -}}
{{- end -}}

{{/* Leader election is needed as soon as two replicas run. */}}
{{- define "csi-nbd.leaderElection" -}}
{{- if or .Values.controller.leaderElection.enabled (gt (int .Values.controller.replicas) 1) -}}true{{- end -}}
{{- end -}}

{{/* The kubelet's directory for this driver's socket. */}}
{{- define "csi-nbd.pluginDir" -}}
{{- printf "%s/plugins/%s" (trimSuffix "/" .Values.kubeletDir) .Values.driverName -}}
{{- end -}}

{{/*
One StorageClass: pass (list $ class). backend, reclaimPolicy,
volumeBindingMode, allowVolumeExpansion and mountOptions default to those of
.Values.storageClass; parameters, secretRef, labels and annotations are the
class's own.
*/}}
{{- define "csi-nbd.storageClass" -}}
{{- $ := index . 0 -}}
{{- $in := index . 1 -}}
{{- $c := dict "name" $in.name "isDefault" $in.isDefault -}}
{{- range $k := list "parameters" "secretRef" "annotations" "labels" -}}
{{- $_ := set $c $k (get $in $k) -}}
{{- end -}}
{{- /* hasKey, not merge: a false or empty entry must win over the default. */ -}}
{{- range $k := list "backend" "reclaimPolicy" "volumeBindingMode" "allowVolumeExpansion" "mountOptions" -}}
{{- $_ := set $c $k (ternary (get $in $k) (get $.Values.storageClass $k) (hasKey $in $k)) -}}
{{- end -}}
{{- if and (eq $c.backend "memory") (ne $c.volumeBindingMode "WaitForFirstConsumer") -}}
{{- fail (printf "StorageClass %s: memory volumes live on one node and need volumeBindingMode WaitForFirstConsumer" $c.name) -}}
{{- end -}}
apiVersion: storage.k8s.io/v1
kind: StorageClass
metadata:
  name: {{ $c.name }}
  labels:
    {{- include "csi-nbd.labels" $ | nindent 4 }}
    {{- with $c.labels }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- if or $c.isDefault $c.annotations }}
  annotations:
    {{- if $c.isDefault }}
    storageclass.kubernetes.io/is-default-class: "true"
    {{- end }}
    {{- with $c.annotations }}
    {{- toYaml . | nindent 4 }}
    {{- end }}
  {{- end }}
provisioner: {{ $.Values.driverName }}
parameters:
  backend: {{ $c.backend | quote }}
  {{- range $k, $v := $c.parameters }}
  {{- if eq $k "backend" }}
  {{- fail (printf "StorageClass %s: set backend with the backend field, not in parameters" $c.name) }}
  {{- end }}
  {{ $k }}: {{ $v | toString | quote }}
  {{- end }}
  {{- with $c.secretRef }}
  {{- if .name }}
  {{- $ns := required (printf "StorageClass %s: secretRef.namespace is required with secretRef.name" $c.name) .namespace }}
  csi.storage.k8s.io/provisioner-secret-name: {{ .name | quote }}
  csi.storage.k8s.io/provisioner-secret-namespace: {{ $ns | quote }}
  csi.storage.k8s.io/node-stage-secret-name: {{ .name | quote }}
  csi.storage.k8s.io/node-stage-secret-namespace: {{ $ns | quote }}
  csi.storage.k8s.io/controller-expand-secret-name: {{ .name | quote }}
  csi.storage.k8s.io/controller-expand-secret-namespace: {{ $ns | quote }}
  {{- end }}
  {{- end }}
reclaimPolicy: {{ $c.reclaimPolicy }}
volumeBindingMode: {{ $c.volumeBindingMode }}
allowVolumeExpansion: {{ $c.allowVolumeExpansion }}
{{- with $c.mountOptions }}
mountOptions:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end -}}

{{/*
Whether the cluster serves storage.k8s.io/v1 VolumeAttributesClass (>= 1.34).
Discovery lists the kind on a live cluster; `helm template` knows only the
version it is given (--kube-version).
*/}}
{{- define "csi-nbd.vacSupported" -}}
{{- if or (.Capabilities.APIVersions.Has "storage.k8s.io/v1/VolumeAttributesClass") (semverCompare ">=1.34.0-0" .Capabilities.KubeVersion.Version) -}}true{{- end -}}
{{- end -}}

{{/*
The container port the liveness probe asks for /healthz: the livenessprobe
sidecar's (healthz), or without the sidecar the plugin's own HTTP server,
which is the metrics port when metrics are on. Pass (list $ component),
component being .Values.controller or .Values.node.
*/}}
{{- define "csi-nbd.livenessPort" -}}
{{- $ := index . 0 -}}{{- $comp := index . 1 -}}
{{- if or $comp.livenessProbe.sidecar (not $.Values.metrics.enabled) -}}healthz{{- else -}}metrics{{- end -}}
{{- end -}}
