{{/* Names ------------------------------------------------------------------------------------ */}}

{{- define "gpu-worker.name" -}}
{{- default .Chart.Name .Values.nameOverride | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gpu-worker.fullname" -}}
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

{{- define "gpu-worker.chart" -}}
{{- printf "%s-%s" .Chart.Name .Chart.Version | replace "+" "_" | trunc 63 | trimSuffix "-" }}
{{- end }}

{{- define "gpu-worker.selectorLabels" -}}
app.kubernetes.io/name: {{ include "gpu-worker.name" . }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end }}

{{- define "gpu-worker.labels" -}}
helm.sh/chart: {{ include "gpu-worker.chart" . }}
{{ include "gpu-worker.selectorLabels" . }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
{{- with .Values.commonLabels }}
{{ toYaml . }}
{{- end }}
{{- end }}

{{- define "gpu-worker.serviceAccountName" -}}
{{- if .Values.serviceAccount.create }}
{{- default (include "gpu-worker.fullname" .) .Values.serviceAccount.name }}
{{- else }}
{{- default "default" .Values.serviceAccount.name }}
{{- end }}
{{- end }}

{{- define "gpu-worker.image" -}}
{{- printf "%s:%s" .Values.image.repository (default .Chart.AppVersion .Values.image.tag) }}
{{- end }}

{{/* The replay's group as the chart knows it: replay.groupId, or a description of the derived one. */}}
{{- define "gpu-worker.replayGroupId" -}}
{{- default (printf "%s-replay-<hash of range, output topic, models and runId>" .Values.kafka.groupId) .Values.replay.groupId }}
{{- end }}

{{- define "gpu-worker.tlsEnabled" -}}
{{- if has .Values.kafka.security.protocol (list "SSL" "SASL_SSL") }}true{{ end }}
{{- end }}

{{- define "gpu-worker.saslEnabled" -}}
{{- if hasPrefix "SASL" .Values.kafka.security.protocol }}true{{ end }}
{{- end }}

{{/* The chart writes KEDA's TriggerAuthentication unless keda.authenticationRef names one: when there is
a credential to pass (SASL, or a TLS Secret). TLS with the system CAs needs only the trigger's tls: enable. */}}
{{- define "gpu-worker.kedaAuthGenerated" -}}
{{- if and (not .Values.keda.authenticationRef) (or (include "gpu-worker.saslEnabled" .) (and (include "gpu-worker.tlsEnabled" .) .Values.kafka.security.tls.secretName)) }}true{{ end }}
{{- end }}

{{/* Checks that values.schema.json cannot express (they compare two values) ---------------- */}}

{{- define "gpu-worker.validate" -}}
{{- $partitions := int .Values.kafka.partitions }}
{{- if and .Values.keda.enabled (gt (int .Values.keda.maxReplicas) $partitions) }}
{{- fail (printf "keda.maxReplicas=%d exceeds kafka.partitions=%d: a consumer beyond the partition count of topic %q gets no partition and holds a GPU idle. Lower keda.maxReplicas, or set kafka.partitions to the topic's real partition count." (int .Values.keda.maxReplicas) $partitions .Values.kafka.inputTopic) }}
{{- end }}
{{- if and .Values.keda.enabled (gt (int .Values.keda.minReplicas) (int .Values.keda.maxReplicas)) }}
{{- fail (printf "keda.minReplicas=%d exceeds keda.maxReplicas=%d" (int .Values.keda.minReplicas) (int .Values.keda.maxReplicas)) }}
{{- end }}
{{- if and (not .Values.keda.enabled) (gt (int .Values.replicaCount) $partitions) }}
{{- fail (printf "replicaCount=%d exceeds kafka.partitions=%d: a consumer beyond the partition count of topic %q gets no partition and holds a GPU idle." (int .Values.replicaCount) $partitions .Values.kafka.inputTopic) }}
{{- end }}
{{- if and (include "gpu-worker.saslEnabled" .) (not .Values.kafka.security.sasl.passwordSecret.name) }}
{{- fail (printf "kafka.security.protocol=%s needs kafka.security.sasl.passwordSecret.name (an existing Secret with the SASL password)" .Values.kafka.security.protocol) }}
{{- end }}
{{- if ne (empty .Values.kafka.security.tls.certKey) (empty .Values.kafka.security.tls.keyKey) }}
{{- fail "kafka.security.tls.certKey and kafka.security.tls.keyKey go together (mutual TLS needs both the client certificate and its key)" }}
{{- end }}
{{- if and .Values.kafka.security.tls.certKey (not .Values.kafka.security.tls.secretName) }}
{{- fail "kafka.security.tls.certKey/keyKey (mutual TLS) need kafka.security.tls.secretName: the Secret holding the client certificate and key" }}
{{- end }}
{{- if and .Values.replay.enabled (eq (include "gpu-worker.replayGroupId" .) .Values.kafka.groupId) }}
{{- fail (printf "replay.groupId=%q is the live consumer group: a replay must use its own group so that it never moves the live group's offsets" .Values.kafka.groupId) }}
{{- end }}
{{- if and (gt (int .Values.gpu.count) 1) (ne (int .Values.worker.gpuDeviceIndex) 0) }}
{{- fail (printf "worker.gpuDeviceIndex=%d with gpu.count=%d: the index picks the GPU of a one-GPU pod; with several, every GPU of the pod gets a GPU process (leave gpuDeviceIndex at 0)" (int .Values.worker.gpuDeviceIndex) (int .Values.gpu.count)) }}
{{- end }}
{{- if and (gt (int .Values.gpu.count) 1) (eq .Values.worker.device "cpu") }}
{{- fail (printf "gpu.count=%d with worker.device=cpu: the GPUs would idle; set worker.device to cuda (or auto)" (int .Values.gpu.count)) }}
{{- end }}
{{- $_ := include "gpu-worker.terminationGracePeriodSeconds" . }}
{{- $_ := include "gpu-worker.progressDeadlineSeconds" . }}
{{- end }}

{{/* WORKER_GPU_DEVICES of a pod with gpu.count > 1: "0,1,..,count-1". The NVIDIA device plugin makes the
pod's GPUs the container's only ones, numbered from 0, whichever cards of the node they are; a list (not
"auto") makes a pod that got fewer GPUs than it asked fail at start with the missing index named. */}}
{{- define "gpu-worker.gpuDevices" -}}
{{- $ids := list }}
{{- range $i := until (int .Values.gpu.count) }}
{{- $ids = append $ids (toString $i) }}
{{- end }}
{{- join "," $ids }}
{{- end }}

{{/* The grace period: every bounded wait of a graceful stop, or the user's value if it covers the drain and
the waits before the final commit. The waits of `worker run` (worker/app.py Worker._shutdown,
worker/supervisor.py Supervisor._stop_all), in order:
  each intake (at once, in parallel): drain drainTimeoutSeconds
    + cut tasks 5 s + producer flush 10 s + final commit 5 s        (the final commit is done by here: +20 s)
    + consumer close 10 s (+5 s when it stops half way) + producer close 10 s + GPU link 5 s
    = drain + 50 s, but the supervisor kills an intake at drain + rebalance_timeout_s (10 s) + 30 s and
    waits 5 s more for it: at most drain + 45 s;
  then the GPU process: 30 s to stop, 5 s more after a kill: 35 s.
Sum: drain + 80 s; plus terminationGraceMarginSeconds for the processes' exit. */}}
{{- define "gpu-worker.terminationGracePeriodSeconds" -}}
{{- $drain := float64 .Values.worker.drainTimeoutSeconds }}
{{- $grace := .Values.terminationGracePeriodSeconds }}
{{- if kindIs "invalid" $grace }}
{{- add (int (ceil $drain)) 80 (int .Values.terminationGraceMarginSeconds) }}
{{- else }}
{{- if le (float64 $grace) (addf $drain 20) }}
{{- fail (printf "terminationGracePeriodSeconds=%v must be above worker.drainTimeoutSeconds=%v plus the 20 s of bounded waits before the final offset commit (cut tasks 5 s, producer flush 10 s, commit 5 s): Kubernetes kills the pod when the grace period ends, cutting the drain and its final offset commit (already-processed messages would be redone). Leave it empty to get drainTimeoutSeconds + 80 + %v, which covers every bounded wait of the shutdown." $grace $drain .Values.terminationGraceMarginSeconds) }}
{{- end }}
{{- int $grace }}
{{- end }}
{{- end }}

{{/* A Kubernetes quantity in bytes: (dict "q" <quantity> "what" <value name>). 16Gi, 512Mi, 16G, 17179869184. */}}
{{- define "gpu-worker.bytes" -}}
{{- $q := toString .q }}
{{- $num := regexFind "^[0-9]+(\\.[0-9]+)?" $q }}
{{- $unit := trimPrefix $num $q }}
{{- $units := dict "" 1 "m" 0.001 "k" 1000 "M" 1000000 "G" 1000000000 "T" 1000000000000 "P" 1000000000000000 "E" 1000000000000000000 "Ki" 1024 "Mi" 1048576 "Gi" 1073741824 "Ti" 1099511627776 "Pi" 1125899906842624 "Ei" 1152921504606846976 }}
{{- if or (not $num) (not (hasKey $units $unit)) }}
{{- fail (printf "%s=%q: not a quantity the chart can read (a number with one of the suffixes m, k, M, G, T, P, E, Ki, Mi, Gi, Ti, Pi, Ei)" .what $q) }}
{{- end }}
{{- int64 (mulf (float64 $num) (float64 (get $units $unit))) }}
{{- end }}

{{/* Bytes as a quantity in Mi, rounded up (readable sizeLimits and requests). */}}
{{- define "gpu-worker.mebibytes" -}}
{{- $mi := int64 1048576 }}
{{- printf "%dMi" (div (add (int64 .) (sub $mi 1)) $mi) }}
{{- end }}

{{/* resources.limits.memory in bytes ("" when there is none). */}}
{{- define "gpu-worker.memoryLimitBytes" -}}
{{- $q := toString (dig "limits" "memory" "" (default dict .Values.resources)) }}
{{- if $q }}
{{- include "gpu-worker.bytes" (dict "q" $q "what" "resources.limits.memory") }}
{{- end }}
{{- end }}

{{/* Intake processes the worker will run: worker.intakeProcesses, or what `worker run` derives by itself
from the CPUs it may use (worker/policy/cpus.py intake_processes_for): with a CPU limit (the cgroup quota
the worker reads), ceil(limit) CPUs -> 1 up to 2 CPUs, else (cpus - 1) / 2, at most 8; without a CPU limit
the worker sees the node's cores, so the chart assumes the most, 8. */}}
{{- define "gpu-worker.intakes" -}}
{{- $set := int .Values.worker.intakeProcesses }}
{{- if gt $set 0 }}
{{- $set }}
{{- else }}
{{- $cpu := toString (dig "limits" "cpu" "" (default dict .Values.resources)) }}
{{- if $cpu }}
{{- $cpus := 0 }}
{{- if hasSuffix "m" $cpu }}
{{- $cpus = int (ceil (divf (float64 (trimSuffix "m" $cpu)) 1000)) }}
{{- else }}
{{- $cpus = int (ceil (float64 $cpu)) }}
{{- end }}
{{- if le $cpus 2 }}1{{ else }}{{ max 1 (min 8 (div (sub $cpus 1) 2)) }}{{ end }}
{{- else }}8{{ end }}
{{- end }}
{{- end }}

{{/* Bytes of large-image segments the chart allows per intake (sharedMemory.overflowPerIntake). */}}
{{- define "gpu-worker.shmOverflowBytes" -}}
{{- include "gpu-worker.bytes" (dict "q" .Values.sharedMemory.overflowPerIntake "what" "sharedMemory.overflowPerIntake") }}
{{- end }}

{{/* /dev/shm size: every intake's ring (worker.ipcSlots x worker.ipcSlotBytes) plus room for the segments
of images larger than a slot (sharedMemory.overflowPerIntake each). Defaults: 8 x (256 x 256 KiB + 128 MiB)
= 1536 MiB. The pages are memory charged to the pod (a memory-medium emptyDir is tmpfs). */}}
{{- define "gpu-worker.shmBytes" -}}
{{- $intakes := int64 (include "gpu-worker.intakes" .) }}
{{- $ring := mul (int64 .Values.worker.ipcSlots) (int64 .Values.worker.ipcSlotBytes) }}
{{- mul $intakes (add $ring (int64 (include "gpu-worker.shmOverflowBytes" .))) }}
{{- end }}

{{/* WORKER_MAX_IN_FLIGHT_BYTES: worker.maxInFlightBytes, or derived from the memory limit ("" without one:
the worker's default). The pod must fit with every intake at its bound:
  limit >= GPU process 4 GiB (CUDA context, engines, pinned staging, host copies of the models)
         + intakes x (1 GiB: interpreter and libraries, its shared-memory ring, decode threads with their
                      decoded rows, result records, two fetches of fetch_max_bytes (2 x 50 MB), one
                      message larger than the bound, alone (max_bytes 20 MB)
                      + sharedMemory.overflowPerIntake: large-image segments in /dev/shm (tmpfs pages are
                        charged to the pod's memory)
                      + max_in_flight_bytes)
with intakes from gpu-worker.intakes (8 without worker.intakeProcesses or a CPU limit). So
  max_in_flight_bytes = (limit - 4 GiB) / intakes - 1 GiB - overflowPerIntake   (16Gi, 8: 384 MiB)
and a limit that leaves less than 64 MiB is refused. */}}
{{- define "gpu-worker.maxInFlightBytes" -}}
{{- $set := .Values.worker.maxInFlightBytes }}
{{- if not (kindIs "invalid" $set) }}
{{- int64 $set }}
{{- else }}
{{- $limit := include "gpu-worker.memoryLimitBytes" . }}
{{- if $limit }}
{{- $gib := int64 1073741824 }}
{{- $intakes := int64 (include "gpu-worker.intakes" .) }}
{{- $overflow := int64 (include "gpu-worker.shmOverflowBytes" .) }}
{{- $bytes := sub (sub (div (sub (int64 $limit) (mul 4 $gib)) $intakes) $gib) $overflow }}
{{- if lt (int64 $bytes) (int64 67108864) }}
{{- fail (printf "resources.limits.memory=%v leaves %d bytes per intake (%d intakes) for messages in flight (under 64 MiB): raise the limit, lower worker.intakeProcesses, or set worker.maxInFlightBytes yourself" .Values.resources.limits.memory $bytes $intakes) }}
{{- end }}
{{- $bytes }}
{{- end }}
{{- end }}
{{- end }}

{{/* KEDA's lagThreshold: keda.lagThreshold, or the lag one pod carries while it keeps up. KEDA counts lag
from committed offsets, so a healthy pod shows
  finished but not yet committed: keda.replicaRate x worker.commitIntervalMs / 1000
  + consumed, unfinished: at most intakes x worker.maxInFlight
Defaults: 2000 x 1 + 8 x 1024 = 10192. Lag above that per replica is work no pod has fetched yet. */}}
{{- define "gpu-worker.lagThreshold" -}}
{{- if not (kindIs "invalid" .Values.keda.lagThreshold) }}
{{- int64 .Values.keda.lagThreshold }}
{{- else }}
{{- $committing := int64 (ceil (divf (mulf (float64 .Values.keda.replicaRate) (float64 .Values.worker.commitIntervalMs)) 1000)) }}
{{- add $committing (mul (int64 (include "gpu-worker.intakes" .)) (int64 .Values.worker.maxInFlight)) }}
{{- end }}
{{- end }}

{{/* progressDeadlineSeconds: the value, or the startup probe's whole window plus 600 s (image pull, init
containers, scheduling): Kubernetes' default of 600 s would report a rollout failed while a pod still
builds TensorRT engines within its startup probe. */}}
{{- define "gpu-worker.startupWindowSeconds" -}}
{{- mul (int .Values.probes.startup.periodSeconds) (int .Values.probes.startup.failureThreshold) }}
{{- end }}
{{- define "gpu-worker.progressDeadlineSeconds" -}}
{{- $window := int (include "gpu-worker.startupWindowSeconds" .) }}
{{- $set := .Values.progressDeadlineSeconds }}
{{- if kindIs "invalid" $set }}
{{- add $window 600 }}
{{- else }}
{{- if le (int $set) $window }}
{{- fail (printf "progressDeadlineSeconds=%v is not above the startup probe's window (periodSeconds x failureThreshold = %d s): Kubernetes would report the rollout failed while a pod still builds its engines" $set $window) }}
{{- end }}
{{- int $set }}
{{- end }}
{{- end }}

{{/* Disk the pod's emptyDirs may fill (ephemeral-storage request): /tmp, the engine cache unless it is a
claim, the model cache, and the models emptyDir (models.source image or url). /dev/shm is memory. */}}
{{- define "gpu-worker.ephemeralBytes" -}}
{{- $sum := int64 (include "gpu-worker.bytes" (dict "q" .Values.tmpSizeLimit "what" "tmpSizeLimit")) }}
{{- if not .Values.engineCache.existingClaim }}
{{- $sum = add $sum (int64 (include "gpu-worker.bytes" (dict "q" .Values.engineCache.sizeLimit "what" "engineCache.sizeLimit"))) }}
{{- end }}
{{- $sum = add $sum (int64 (include "gpu-worker.bytes" (dict "q" .Values.modelCache.sizeLimit "what" "modelCache.sizeLimit"))) }}
{{- if has .Values.models.source (list "image" "url") }}
{{- $sum = add $sum (int64 (include "gpu-worker.bytes" (dict "q" .Values.models.sizeLimit "what" "models.sizeLimit"))) }}
{{- end }}
{{- $sum }}
{{- end }}

{{/* Environment shared by the worker Deployment and the replay Job ------------------------------ */}}

{{- define "gpu-worker.env" -}}
- name: POD_NAME
  valueFrom:
    fieldRef:
      fieldPath: metadata.name
- name: WORKER_CLIENT_ID
  value: "$(POD_NAME)"
- name: WORKER_BOOTSTRAP_SERVERS
  value: {{ .Values.kafka.bootstrapServers | quote }}
- name: WORKER_INPUT_TOPIC
  value: {{ .Values.kafka.inputTopic | quote }}
- name: WORKER_OUTPUT_TOPIC
  value: {{ .Values.kafka.outputTopic | quote }}
- name: WORKER_DLQ_TOPIC
  value: {{ .Values.kafka.dlqTopic | quote }}
- name: WORKER_SECURITY_PROTOCOL
  value: {{ .Values.kafka.security.protocol | quote }}
{{- if include "gpu-worker.saslEnabled" . }}
- name: WORKER_SASL_MECHANISM
  value: {{ .Values.kafka.security.sasl.mechanism | quote }}
- name: WORKER_SASL_USERNAME
  value: {{ .Values.kafka.security.sasl.username | quote }}
{{- with .Values.kafka.security.sasl.passwordSecret }}
{{- if .name }}
- name: WORKER_SASL_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .name | quote }}
      key: {{ .key | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- if include "gpu-worker.tlsEnabled" . }}
{{- with .Values.kafka.security.tls }}
{{- if .secretName }}
- name: WORKER_SSL_CAFILE
  value: {{ printf "/etc/gpu-worker/kafka-tls/%s" .caKey | quote }}
{{- if .certKey }}
- name: WORKER_SSL_CERTFILE
  value: {{ printf "/etc/gpu-worker/kafka-tls/%s" .certKey | quote }}
- name: WORKER_SSL_KEYFILE
  value: {{ printf "/etc/gpu-worker/kafka-tls/%s" .keyKey | quote }}
{{- end }}
{{- end }}
{{- if .keyPasswordSecret.name }}
- name: WORKER_SSL_KEYFILE_PASSWORD
  valueFrom:
    secretKeyRef:
      name: {{ .keyPasswordSecret.name | quote }}
      key: {{ .keyPasswordSecret.key | quote }}
{{- end }}
{{- end }}
{{- end }}
{{- if .Values.pipeline }}
- name: WORKER_PIPELINE
  value: "/etc/gpu-worker/pipeline/pipeline.yaml"
{{- end }}
{{- with .Values.worker }}
- name: WORKER_DEVICE
  value: {{ .device | quote }}
- name: WORKER_GPU_DEVICE_INDEX
  value: {{ int .gpuDeviceIndex | quote }}
{{- if gt (int $.Values.gpu.count) 1 }}
- name: WORKER_GPU_DEVICES
  value: {{ include "gpu-worker.gpuDevices" $ | quote }}
{{- end }}
- name: WORKER_MAX_BATCH_SIZE
  value: {{ int .maxBatchSize | quote }}
- name: WORKER_MAX_WAIT_MS
  value: {{ toString .maxWaitMs | quote }}
- name: WORKER_DECODER
  value: {{ .decoder | quote }}
- name: WORKER_DECODE_WORKERS
  value: {{ int .decodeWorkers | quote }}
- name: WORKER_MAX_IN_FLIGHT
  value: {{ int .maxInFlight | quote }}
- name: WORKER_INTAKE_PROCESSES
  value: {{ int .intakeProcesses | quote }}
- name: WORKER_IPC_SLOTS
  value: {{ int .ipcSlots | quote }}
- name: WORKER_IPC_SLOT_BYTES
  value: {{ int .ipcSlotBytes | quote }}
- name: WORKER_COMMIT_INTERVAL_MS
  value: {{ int .commitIntervalMs | quote }}
- name: WORKER_PROCESSING_GUARANTEE
  value: {{ .processingGuarantee | default "at-least-once" | quote }}
{{- with (include "gpu-worker.maxInFlightBytes" $) }}
- name: WORKER_MAX_IN_FLIGHT_BYTES
  value: {{ . | quote }}
{{- end }}
- name: WORKER_DRAIN_TIMEOUT_S
  value: {{ toString .drainTimeoutSeconds | quote }}
- name: WORKER_HTTP_PORT
  value: {{ int .httpPort | quote }}
- name: WORKER_LOG_FORMAT
  value: {{ .logFormat | quote }}
- name: WORKER_LOG_LEVEL
  value: {{ .logLevel | quote }}
- name: WORKER_ENGINE_CACHE_DIR
  value: {{ .engineCacheDir | quote }}
- name: WORKER_MODEL_CACHE
  value: {{ .modelCacheDir | quote }}
# The CUDA driver's JIT cache defaults to ~/.nv, which the read-only root filesystem would disable.
- name: CUDA_CACHE_PATH
  value: /tmp/cuda-cache
{{- with .extraEnv }}
{{ toYaml . }}
{{- end }}
{{- end }}
{{- end }}

{{/* Volumes and mounts ------------------------------------------------------------------------ */}}

{{- define "gpu-worker.volumes" -}}
- name: tmp
  emptyDir:
    sizeLimit: {{ .Values.tmpSizeLimit }}
- name: engine-cache
{{- if .Values.engineCache.existingClaim }}
  persistentVolumeClaim:
    claimName: {{ .Values.engineCache.existingClaim }}
{{- else }}
  emptyDir:
    sizeLimit: {{ .Values.engineCache.sizeLimit }}
{{- end }}
- name: model-cache
  emptyDir:
    sizeLimit: {{ .Values.modelCache.sizeLimit }}
# The intakes hand images to the GPU process through /dev/shm; a container's default is 64 MiB.
- name: dshm
  emptyDir:
    medium: Memory
    sizeLimit: {{ include "gpu-worker.mebibytes" (include "gpu-worker.shmBytes" .) }}
{{- if .Values.pipeline }}
- name: pipeline
  configMap:
    name: {{ include "gpu-worker.fullname" . }}-pipeline
{{- end }}
{{- if and (include "gpu-worker.tlsEnabled" .) .Values.kafka.security.tls.secretName }}
- name: kafka-tls
  secret:
    secretName: {{ .Values.kafka.security.tls.secretName }}
    defaultMode: 0440
{{- end }}
{{- if eq .Values.models.source "pvc" }}
- name: models
  persistentVolumeClaim:
    claimName: {{ .Values.models.pvc.claimName }}
    readOnly: true
{{- else if has .Values.models.source (list "image" "url") }}
- name: models
  emptyDir:
    sizeLimit: {{ .Values.models.sizeLimit }}
{{- end }}
{{- end }}

{{- define "gpu-worker.volumeMounts" -}}
- name: tmp
  mountPath: /tmp
- name: engine-cache
  mountPath: {{ .Values.worker.engineCacheDir }}
- name: model-cache
  mountPath: {{ .Values.worker.modelCacheDir }}
- name: dshm
  mountPath: /dev/shm
{{- if .Values.pipeline }}
- name: pipeline
  mountPath: /etc/gpu-worker/pipeline
  readOnly: true
{{- end }}
{{- if and (include "gpu-worker.tlsEnabled" .) .Values.kafka.security.tls.secretName }}
- name: kafka-tls
  mountPath: /etc/gpu-worker/kafka-tls
  readOnly: true
{{- end }}
{{- if ne .Values.models.source "none" }}
- name: models
  mountPath: {{ .Values.models.mountPath }}
  readOnly: true
{{- if and (eq .Values.models.source "pvc") .Values.models.pvc.subPath }}
  subPath: {{ .Values.models.pvc.subPath }}
{{- end }}
{{- end }}
{{- end }}

{{/* Init containers that fill the models emptyDir --------------------------------------------- */}}

{{- define "gpu-worker.initContainers" -}}
{{- $m := .Values.models }}
{{- if eq $m.source "image" }}
- name: copy-models
  image: {{ printf "%s:%s" $m.image.repository $m.image.tag | quote }}
  imagePullPolicy: {{ $m.image.pullPolicy }}
  command: ["/bin/sh", "-ec", 'cp -R "$MODELS_SRC"/. "$MODELS_DIR"/ && ls -la "$MODELS_DIR"']
  env:
    - name: MODELS_SRC
      value: {{ $m.image.path | quote }}
    - name: MODELS_DIR
      value: /models-out
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  resources:
    {{- toYaml $m.initResources | nindent 4 }}
  volumeMounts:
    - name: models
      mountPath: /models-out
{{- else if eq $m.source "url" }}
- name: download-models
  image: {{ printf "%s:%s" $m.url.image.repository $m.url.image.tag | quote }}
  imagePullPolicy: {{ $m.url.image.pullPolicy }}
  # Arguments come in triples: url, file name, sha256 ("-": not checked). Passed as arguments, not
  # pasted into the script, so that no value can change the script.
  command:
    - /bin/sh
    - -ec
    - |
      cd "$MODELS_DIR"
      while [ "$#" -gt 0 ]; do
        url=$1; name=$2; sum=$3; shift 3
        echo "downloading $url -> $MODELS_DIR/$name"
        curl --fail --silent --show-error --location --retry 5 --retry-connrefused \
          --output "$name.part" "$url"
        if [ "$sum" != "-" ]; then echo "$sum  $name.part" | sha256sum -c -; fi
        mv "$name.part" "$name"
      done
    - download-models
  args:
    {{- range $m.url.files }}
    - {{ .url | quote }}
    - {{ .filename | quote }}
    - {{ default "-" .sha256 | quote }}
    {{- end }}
  env:
    - name: MODELS_DIR
      value: /models-out
    - name: HOME
      value: /tmp
  securityContext:
    {{- toYaml .Values.securityContext | nindent 4 }}
  resources:
    {{- toYaml $m.initResources | nindent 4 }}
  volumeMounts:
    - name: models
      mountPath: /models-out
    - name: tmp
      mountPath: /tmp
{{- end }}
{{- end }}

{{/* Pod placement shared by the Deployment and the replay Job -------------------------------- */}}

{{- define "gpu-worker.podPlacement" -}}
{{- with .Values.imagePullSecrets }}
imagePullSecrets:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.runtimeClassName }}
runtimeClassName: {{ . }}
{{- end }}
{{- with .Values.priorityClassName }}
priorityClassName: {{ . }}
{{- end }}
{{- with .Values.nodeSelector }}
nodeSelector:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.tolerations }}
tolerations:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- with .Values.affinity }}
affinity:
  {{- toYaml . | nindent 2 }}
{{- end }}
{{- end }}

{{- define "gpu-worker.resources" -}}
{{- $res := deepCopy .Values.resources }}
{{- $limits := default dict $res.limits }}
{{- $_ := set $limits .Values.gpu.resourceName (int .Values.gpu.count) }}
{{- $_ := set $res "limits" $limits }}
{{- $requests := default dict $res.requests }}
{{- if not (hasKey $requests "ephemeral-storage") }}
{{- $_ := set $requests "ephemeral-storage" (include "gpu-worker.mebibytes" (include "gpu-worker.ephemeralBytes" .)) }}
{{- end }}
{{- $_ := set $res "requests" $requests }}
{{- toYaml $res }}
{{- end }}
