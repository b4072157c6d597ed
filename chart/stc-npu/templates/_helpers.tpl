{{/*
Helpers of the stc-npu chart. Every object's name, labels and namespace come
from here, so they cannot differ between templates.
*/}}

{{/* The chart name. There is no nameOverride: it would change the selector. */}}
{{- define "stc-npu.name" -}}
{{- .Chart.Name -}}
{{- end -}}

{{/*
Object names: fullnameOverride when set; else the release name when it
already contains the chart name (the documented `helm install stc-npu ...`
gives plain "stc-npu"), otherwise <release>-stc-npu; at most 63 characters.
The selector does not use it (stc-npu.selectorLabels).
*/}}
{{- define "stc-npu.fullname" -}}
{{- if .Values.fullnameOverride -}}
{{- .Values.fullnameOverride | trunc 63 | trimSuffix "-" -}}
{{- else if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "stc-npu.namespace" -}}
{{- default .Release.Namespace .Values.namespaceOverride -}}
{{- end -}}

{{/*
Selector labels: name and instance only. They are immutable on a DaemonSet, so
they must never change between chart versions (tests/chart/previous holds the
ones 0.1.0 committed to).
*/}}
{{- define "stc-npu.selectorLabels" -}}
app.kubernetes.io/name: {{ include "stc-npu.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{/* The chart's own labels of its objects (commonLabels cannot replace them). */}}
{{- define "stc-npu.chartLabels" -}}
{{ include "stc-npu.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: device-plugin
app.kubernetes.io/part-of: stc-npu
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end -}}

{{- define "stc-npu.labels" -}}
{{ include "stc-npu.chartLabels" . }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/*
Labels of the agent pods: only those that change when the pod must change.
No helm.sh/chart and no app.kubernetes.io/version: a chart-only release, or a
new appVersion with the image pinned by image.tag, must not restart every
agent (the image and the config checksum already change the template when
the pod must change).
*/}}
{{- define "stc-npu.podTemplateLabels" -}}
{{ include "stc-npu.selectorLabels" . }}
app.kubernetes.io/component: device-plugin
app.kubernetes.io/part-of: stc-npu
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}

{{/* The agent pods' ServiceAccount. */}}
{{- define "stc-npu.serviceAccountName" -}}
{{- if .Values.serviceAccount.create -}}
{{- .Values.serviceAccount.name | default (include "stc-npu.fullname" .) -}}
{{- else -}}
{{- .Values.serviceAccount.name | default "default" -}}
{{- end -}}
{{- end -}}

{{/*
Kubernetes before 1.19 has no seccompProfile field; its API server drops the
field silently, so the profile is rendered as the alpha annotation instead.
.Capabilities.KubeVersion is the cluster's version on install and upgrade,
and --kube-version for `helm template` (Argo CD passes the destination's).
*/}}
{{- define "stc-npu.legacySeccomp" -}}
{{- if semverCompare "<1.19.0-0" .Capabilities.KubeVersion.Version -}}true{{- end -}}
{{- end -}}

{{/* The alpha annotation's value for a seccompProfile ("" when none). */}}
{{- define "stc-npu.seccompAnnotation" -}}
{{- $profile := . | default dict -}}
{{- if eq ($profile.type | default "") "RuntimeDefault" -}}runtime/default
{{- else if eq ($profile.type | default "") "Unconfined" -}}unconfined
{{- else if eq ($profile.type | default "") "Localhost" -}}localhost/{{ $profile.localhostProfile }}
{{- end -}}
{{- end -}}

{{/*
A securityContext (pod or container) as rendered: the values, without
seccompProfile on clusters before 1.19 (see stc-npu.legacySeccomp).
Argument: (dict "context" <map> "legacy" <bool string>).
*/}}
{{- define "stc-npu.securityContext" -}}
{{- $context := deepCopy (.context | default dict) -}}
{{- if .legacy -}}
{{- $_ := unset $context "seccompProfile" -}}
{{- end -}}
{{- if $context -}}
{{ toYaml $context }}
{{- end -}}
{{- end -}}

{{/* An image reference from {repository, tag, digest}: the digest wins. */}}
{{- define "stc-npu.imageRef" -}}
{{- if .image.digest -}}
{{- printf "%s@%s" .image.repository .image.digest -}}
{{- else -}}
{{- printf "%s:%s" .image.repository (.image.tag | default .defaultTag) -}}
{{- end -}}
{{- end -}}

{{/* Where the host's devDir appears inside the agent container. */}}
{{- define "stc-npu.hostDevMount" -}}
/host/dev
{{- end -}}

{{/* Where the host's sysDir appears inside the agent container. */}}
{{- define "stc-npu.hostSysMount" -}}
/host/sys
{{- end -}}

{{/* Where the host's hpe.hostPath appears inside the agent container (mapped mode). */}}
{{- define "stc-npu.hostHpeMount" -}}
/host/hpe
{{- end -}}

{{- define "stc-npu.configDir" -}}
/etc/stc-npu
{{- end -}}

{{/*
The agent's config file. Only resourceName, hpe, discovery,
deviceListStrategy, stcSetDevices, cdi, health, sharing, mode, registration
and pluginRegistryDir (and dra.stateDir, derived from it), dra, written field by
field in a fixed order (the agent's own order; health as sorted YAML), so the
file and its checksum depend only on these values. The discovery lists and
the later sections came after 0.1.0: an upgrade with --reuse-values has
none, and the agent's defaults (the same as values.yaml's) apply.
*/}}
{{- define "stc-npu.configFile" -}}
resourceName: {{ .Values.resourceName | quote }}
hpe:
  mode: {{ .Values.hpe.mode | quote }}
  hostPath: {{ .Values.hpe.hostPath | quote }}
  containerPath: {{ .Values.hpe.containerPath | quote }}
discovery:
  npuPattern: {{ .Values.discovery.npuPattern | quote }}
  memberPattern: {{ .Values.discovery.memberPattern | quote }}
{{- range $key := list "requiredMembers" "pciVendors" "drivers" }}
{{- if hasKey $.Values.discovery $key }}
  {{ $key }}: {{ get $.Values.discovery $key | toJson }}
{{- end }}
{{- end }}
deviceListStrategy:
{{- range include "stc-npu.deviceListStrategy" . | fromJsonArray }}
  - {{ . | quote }}
{{- end }}
stcSetDevices: {{ .Values.stcSetDevices | default "none" | quote }}
cdi:
  specDir: {{ include "stc-npu.cdiSpecDir" . | quote }}
{{- with .Values.health }}
health:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- $sharing := .Values.sharing | default dict }}
sharing:
  replicas: {{ include "stc-npu.replicas" . }}
  renameShared: {{ dig "renameShared" false $sharing }}
  failRequestsGreaterThanOne: {{ dig "failRequestsGreaterThanOne" false $sharing }}
mode: {{ include "stc-npu.mode" . | quote }}
registration: {{ include "stc-npu.registration" . | quote }}
pluginRegistryDir: {{ include "stc-npu.pluginRegistryDir" . | quote }}
dra:
  stateDir: {{ include "stc-npu.draStateDir" . | quote }}
  sliceIntervalSeconds: {{ dig "sliceIntervalSeconds" 1 (.Values.dra | default dict) }}
{{- $nfd := include "stc-npu.nfd" . | fromJson }}
metrics:
  enabled: {{ include "stc-npu.metrics" . | fromJson | dig "enabled" false }}
nfd:
  enabled: {{ $nfd.enabled }}
  featureFile: {{ printf "%s/stc-npu" $nfd.hostPath | quote }}
  expirySeconds: {{ int $nfd.expirySeconds }}
  models: {{ $nfd.models | toJson }}
  hpeVersionFile: {{ $nfd.hpeVersionFile | quote }}
{{- end -}}

{{/*
mode, registration and pluginRegistryDir with their defaults (absent after
a --reuse-values upgrade from an older release). registration is the
effective one: mode dra always registers through the plugin watcher.
*/}}
{{- define "stc-npu.mode" -}}
{{- .Values.mode | default "device-plugin" -}}
{{- end -}}

{{- define "stc-npu.registration" -}}
{{- if eq (include "stc-npu.mode" .) "dra" -}}
plugin-watcher
{{- else -}}
{{- .Values.registration | default "kubelet-socket" -}}
{{- end -}}
{{- end -}}

{{- define "stc-npu.pluginRegistryDir" -}}
{{- .Values.pluginRegistryDir | default "/var/lib/kubelet/plugins_registry" -}}
{{- end -}}

{{/* "true" when the agent registers through the kubelet's plugin watcher. */}}
{{- define "stc-npu.usesPluginRegistry" -}}
{{- if eq (include "stc-npu.registration" .) "plugin-watcher" -}}true{{- end -}}
{{- end -}}

{{/* The DRA driver's own dir (its checkpoint): <kubelet root>/plugins/<driver>. */}}
{{- define "stc-npu.draStateDir" -}}
{{- printf "%s/plugins/npu.streamcomputing.com" (dir (include "stc-npu.pluginRegistryDir" .)) -}}
{{- end -}}

{{/*
deviceListStrategy, cdi.specDir and sharing with their defaults. Keys added after
0.1.0 may be absent: `helm upgrade --reuse-values` (helm 3) renders with the
old release's values, not this chart's values.yaml.
*/}}
{{- define "stc-npu.deviceListStrategy" -}}
{{- .Values.deviceListStrategy | default (list "device-specs") | toJson -}}
{{- end -}}

{{- define "stc-npu.cdiSpecDir" -}}
{{- dig "specDir" "/var/run/cdi" (.Values.cdi | default dict) -}}
{{- end -}}

{{/* sharing.replicas, 1 when absent (releases before sharing, see above). */}}
{{- define "stc-npu.replicas" -}}
{{- dig "replicas" 1 (.Values.sharing | default dict) | int -}}
{{- end -}}

{{/*
The resource the agent registers and pods request: resourceName, or
<resourceName>.shared when sharing.renameShared renames shared NPUs (the
agent's own rule, core/config.py advertised_resource).
*/}}
{{- define "stc-npu.advertisedResource" -}}
{{- if and (gt (int (include "stc-npu.replicas" .)) 1) (dig "renameShared" false (.Values.sharing | default dict)) -}}
{{- printf "%s.shared" .Values.resourceName -}}
{{- else -}}
{{- .Values.resourceName -}}
{{- end -}}
{{- end -}}

{{/* "true" when devices are handed out by CDI name (Allocate with cdi-cri, or
mode dra): the agent then writes the spec. */}}
{{- define "stc-npu.usesCdi" -}}
{{- if or (eq (include "stc-npu.mode" .) "dra") (has "cdi-cri" (include "stc-npu.deviceListStrategy" . | fromJsonArray)) -}}true{{- end -}}
{{- end -}}

{{/*
The metrics and nfd values with their defaults, as JSON: an upgrade with
--reuse-values from a release before them has neither, and must render.
*/}}
{{- define "stc-npu.metrics" -}}
{{- $monitor := dict "enabled" false "interval" "30s" "labels" dict -}}
{{- $defaults := dict "enabled" false "service" (dict "enabled" false) "serviceMonitor" $monitor "podMonitor" (deepCopy $monitor) -}}
{{- mergeOverwrite $defaults (deepCopy (.Values.metrics | default dict)) | toJson -}}
{{- end -}}

{{- define "stc-npu.nfd" -}}
{{- $defaults := dict "enabled" false "hostPath" "/etc/kubernetes/node-feature-discovery/features.d" "expirySeconds" 300 "models" (dict "0x0100" "STCP920") "hpeVersionFile" "version" -}}
{{- $nfd := deepCopy (.Values.nfd | default dict) -}}
{{- /* A map of the user's: theirs replaces ours whole (merging would keep 0x0100). */ -}}
{{- if hasKey $nfd "models" }}{{ $_ := set $defaults "models" (dict) }}{{ end -}}
{{- mergeOverwrite $defaults $nfd | toJson -}}
{{- end -}}

{{/*
"true" when the vendor probe is on, else "" (an upgrade with --reuse-values
from 0.1.0 has no health values: off).
*/}}
{{- define "stc-npu.vendorProbe" -}}
{{- if dig "vendorProbe" "enabled" false (.Values.health | default dict) }}true{{ end -}}
{{- end -}}

{{/*
The agent's settings, all in one place, as the STC_NPU_* environment
variables of its flags, in a fixed order, and no container args: `kubectl
exec ... -- stc-npu-agent diagnose` inherits the container's environment but
not its args, so the agent and diagnose run in its pod see the same settings.
STC_NPU_HPE_DIR (mapped mode only) comes last, so that hpe.mode changes nothing
but its own entry. templates/validate.yaml refuses extraEnv entries with these
names.
*/}}
{{- define "stc-npu.agentEnv" -}}
- name: STC_NPU_KUBELET_DIR
  value: {{ .Values.kubeletDir | quote }}
- name: STC_NPU_DEV_DIR
  value: {{ include "stc-npu.hostDevMount" . | quote }}
- name: STC_NPU_CONFIG
  value: {{ printf "%s/config.yaml" (include "stc-npu.configDir" .) | quote }}
- name: STC_NPU_LOG_LEVEL
  value: {{ .Values.logLevel | quote }}
- name: STC_NPU_LOG_FORMAT
  value: {{ .Values.logFormat | quote }}
- name: STC_NPU_PROBE_ADDRESS
  value: {{ printf ":%d" (int .Values.probes.port) | quote }}
- name: STC_NPU_SYS_DIR
  value: {{ include "stc-npu.hostSysMount" . | quote }}
{{- if eq .Values.hpe.mode "mapped" }}
- name: STC_NPU_HPE_DIR
  value: {{ include "stc-npu.hostHpeMount" . | quote }}
{{- end }}
{{- if eq (include "stc-npu.mode" .) "dra" }}
- name: STC_NPU_NODE_NAME
  valueFrom:
    fieldRef:
      fieldPath: spec.nodeName
{{- end }}
{{- end -}}

{{/*
Labels of the helm test pod. Deliberately NOT the selector labels: the
DaemonSet would adopt an orphan pod that matches its selector.
*/}}
{{- define "stc-npu.testLabels" -}}
app.kubernetes.io/name: {{ include "stc-npu.name" . }}-test
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/component: test
app.kubernetes.io/part-of: stc-npu
app.kubernetes.io/managed-by: {{ .Release.Service }}
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end -}}
