"""The Helm chart (helm/gpu-worker), rendered by Helm's own engine and checked against Kubernetes schemas.

Rendering goes through ``helm-python-sdk`` (Helm v4's Go SDK behind a C ABI, loaded with ctypes:
no helm binary, no cluster, no network). Rendering runs ``values.schema.json`` first, exactly as
``helm install`` does, so bad values fail here the way they fail for a user.

Every rendered object is validated with ``kubernetes-validate`` (the OpenAPI schemas of Kubernetes
releases, shipped inside the package) in strict mode, which also rejects unknown fields. The two
custom resources (PodMonitor, ScaledObject) have no schema there: their key fields are checked by hand.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import promql_parser
import pytest
import yaml

helm = pytest.importorskip("helm_python", reason="helm-python-sdk is not installed (pip install -e '.[dev]')")
kv = pytest.importorskip("kubernetes_validate.utils",
                         reason="kubernetes-validate is not installed (pip install -e '.[dev]')")

CHART_DIR = Path(__file__).resolve().parents[1] / "helm" / "gpu-worker"
# The oldest Kubernetes the chart declares (Chart.yaml kubeVersion) and the newest with schemas.
K8S_VERSIONS = ("1.26.0", kv.latest_version())
CUSTOM_KINDS = {"PodMonitor", "ScaledObject", "TriggerAuthentication", "PrometheusRule"}
RELEASE, NAMESPACE = "vision", "inference"
FULLNAME = f"{RELEASE}-gpu-worker"

BASE = {"kafka": {"bootstrapServers": "kafka-0.kafka:9092,kafka-1.kafka:9092"}}

PIPELINE = {
    "models": [{
        "name": "resnet50",
        "version": "2026-11-01",
        "path": "/models/resnet50.onnx",
        "backend": "tensorrt",
        "preprocess": {"width": 224, "height": 224, "resize": "letterbox", "color": "rgb", "layout": "nchw",
                       "dtype": "float16", "scale": 0.00392156862745098,
                       "mean": [0.485, 0.456, 0.406], "std": [0.229, 0.224, 0.225]},
        "outputs": [{"name": "logits", "kind": "topk", "k": 5, "labels": "imagenet.txt", "softmax": True}],
    }],
}

EVERYTHING = {
    "kafka": {
        "bootstrapServers": "b-1.msk:9096,b-2.msk:9096",
        "inputTopic": "camera.frames",
        "outputTopic": "camera.labels",
        "dlqTopic": "camera.frames.dlq",
        "groupId": "labeller",
        "partitions": 6,
        "security": {
            "protocol": "SASL_SSL",
            "sasl": {"mechanism": "SCRAM-SHA-512", "username": "labeller",
                     "passwordSecret": {"name": "kafka-user-labeller", "key": "password"}},
            "tls": {"secretName": "kafka-ca", "caKey": "ca.crt", "certKey": "tls.crt", "keyKey": "tls.key"},
        },
    },
    "runtimeClassName": "nvidia",
    "nodeSelector": {"cloud.google.com/gke-accelerator": "nvidia-l4"},
    "gpu": {"count": 1},
    "worker": {"maxBatchSize": 64, "maxWaitMs": 2.5, "drainTimeoutSeconds": 45.5, "decodeWorkers": 6},
    "pipeline": PIPELINE,
    "pipelineFiles": {"imagenet.txt": "tench\ngoldfish\n"},
    "models": {"source": "pvc", "pvc": {"claimName": "model-store", "subPath": "vision"}},
    "engineCache": {"existingClaim": "trt-engines"},
    "podMonitor": {"enabled": True, "labels": {"release": "kube-prometheus-stack"}},
    "keda": {"enabled": True, "minReplicas": 1, "maxReplicas": 6, "lagThreshold": 500,
             "authenticationRef": "kafka-keda-auth"},
    "replay": {
        "enabled": True,
        "from": "timestamp", "fromTimestamp": "2026-11-01T00:00:00Z",
        "until": "offsets", "untilOffsets": "0:1000,1:2000",
        "partitions": [0, 1],
        "outputTopic": "camera.labels.v2",
        "rate": 200,
        "backoffLimit": 4,
    },
}


def merge(*layers: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for layer in layers:
        for key, value in layer.items():
            if isinstance(value, dict) and isinstance(out.get(key), dict):
                out[key] = merge(out[key], value)
            else:
                out[key] = copy.deepcopy(value)
    return out


@pytest.fixture(scope="module")
def chart():
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


class Rendered:
    def __init__(self, manifests: dict[str, str]) -> None:
        self.notes = next((v for k, v in manifests.items() if k.endswith("NOTES.txt")), "")
        self.objects = [doc for name, text in sorted(manifests.items()) if not name.endswith(".txt")
                        for doc in yaml.safe_load_all(text) if doc]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [o for o in self.objects if o["kind"] == kind]

    def one(self, kind: str) -> dict[str, Any]:
        found = self.all(kind)
        assert len(found) == 1, f"expected one {kind}, got {[o['metadata']['name'] for o in found]}"
        return found[0]

    @property
    def kinds(self) -> set[str]:
        return {o["kind"] for o in self.objects}


def render(chart, *layers: dict[str, Any]) -> Rendered:
    return Rendered(chart.render(merge(*layers), name=RELEASE, namespace=NAMESPACE))


def validate_all(rendered: Rendered) -> None:
    for obj in rendered.objects:
        if obj["kind"] in CUSTOM_KINDS:
            continue
        for version in K8S_VERSIONS:
            try:
                kv.validate(obj, version, strict=True)
            except kv.ValidationError as exc:
                path = ".".join(str(p) for p in exc.path)
                pytest.fail(f"{obj['kind']}/{obj['metadata']['name']} is invalid for Kubernetes {version} "
                            f"at {path}: {exc.message}")


def container(pod_spec: dict[str, Any], name: str) -> dict[str, Any]:
    return next(c for c in pod_spec["containers"] if c["name"] == name)


def env_of(c: dict[str, Any]) -> dict[str, Any]:
    """Plain values as strings; secret and field references as their ref objects."""
    out = {}
    for e in c["env"]:
        assert e["name"] not in out, f"duplicate env {e['name']}"
        out[e["name"]] = e.get("value", e.get("valueFrom"))
    return out


def volumes_by_name(pod_spec: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in pod_spec.get("volumes", [])}


def mounts_by_path(c: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["mountPath"]: m for m in c.get("volumeMounts", [])}


# --- defaults ------------------------------------------------------------------------------------


def test_defaults_render_valid_objects(chart):
    r = render(chart, BASE)
    validate_all(r)
    assert r.kinds == {"Deployment", "Service", "ServiceAccount", "PodDisruptionBudget"}


def test_defaults_deployment_key_fields(chart):
    dep = render(chart, BASE).one("Deployment")
    assert dep["metadata"]["name"] == FULLNAME
    assert dep["spec"]["replicas"] == 1
    pod = dep["spec"]["template"]["spec"]
    worker = container(pod, "worker")

    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert worker["args"] == ["run"]
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert "runtimeClassName" not in pod

    assert worker["ports"] == [{"name": "http", "containerPort": 8080, "protocol": "TCP"}]
    assert worker["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert worker["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    startup = worker["startupProbe"]
    assert startup["httpGet"] == {"path": "/healthz", "port": "http"}
    assert startup["failureThreshold"] * startup["periodSeconds"] >= 15 * 60, "too short for a TensorRT build"

    env = env_of(worker)
    assert env["WORKER_BOOTSTRAP_SERVERS"] == "kafka-0.kafka:9092,kafka-1.kafka:9092"
    assert env["WORKER_INPUT_TOPIC"] == "images"
    assert env["WORKER_OUTPUT_TOPIC"] == "results"
    assert env["WORKER_DLQ_TOPIC"] == "images.dlq"
    assert env["WORKER_GROUP_ID"] == "gpu-worker"
    assert env["WORKER_SECURITY_PROTOCOL"] == "PLAINTEXT"
    assert env["WORKER_DEVICE"] == "cuda"
    assert env["WORKER_GPU_DEVICE_INDEX"] == "0"
    assert env["WORKER_MAX_BATCH_SIZE"] == "32"
    assert env["WORKER_MAX_WAIT_MS"] == "5"
    assert env["WORKER_DECODE_WORKERS"] == "4"
    assert env["WORKER_DECODER"] == "hybrid"
    assert env["WORKER_MAX_IN_FLIGHT"] == "1024"
    assert env["WORKER_DRAIN_TIMEOUT_S"] == "20"
    assert env["WORKER_HTTP_PORT"] == "8080"
    assert env["WORKER_LOG_FORMAT"] == "json"
    assert env["WORKER_ENGINE_CACHE_DIR"] == "/var/cache/gpu-worker/engines"
    assert env["WORKER_MODEL_CACHE"] == "/var/cache/gpu-worker/models"
    assert env["WORKER_CLIENT_ID"] == "$(POD_NAME)"
    assert env["CUDA_CACHE_PATH"].startswith("/tmp/")  # writable under a read-only root
    # No pipeline in values: no ConfigMap, the worker's bundled demo pipeline.
    assert "WORKER_PIPELINE" not in env
    assert not any(k.startswith(("WORKER_SASL", "WORKER_SSL")) for k in env)

    # Grace period: drain timeout + margin.
    assert pod["terminationGracePeriodSeconds"] == 20 + 80 + 5  # drain + the other bounded waits + margin

    # Non-root, read-only root, writable /tmp and engine cache.
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    sc = worker["securityContext"]
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    vols, mounts = volumes_by_name(pod), mounts_by_path(worker)
    assert vols[mounts["/tmp"]["name"]]["emptyDir"] is not None
    assert "emptyDir" in vols[mounts["/var/cache/gpu-worker/engines"]["name"]]
    assert "/models" not in mounts


def test_defaults_service_pdb_and_notes(chart):
    r = render(chart, BASE)
    svc = r.one("Service")
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}]
    dep = r.one("Deployment")
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    pdb = r.one("PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    assert "worker_consumer_lag_messages" in r.notes
    assert "worker_batch_size" in r.notes
    assert "bundled demo pipeline" in r.notes


def test_chart_lints_clean(chart):
    report = helm.lint(CHART_DIR, merge(BASE), strict=True)
    problems = [m for m in report["messages"] if m["severity"] >= 2] + report.get("errors", [])
    # Helm's only strict finding on this chart would be "icon is recommended" (severity 1, info).
    assert problems == []


# --- every optional feature on ------------------------------------------------------------------------


def test_everything_on_renders_valid_objects(chart):
    r = render(chart, EVERYTHING)
    validate_all(r)
    assert r.kinds == {"Deployment", "Service", "ServiceAccount", "PodDisruptionBudget", "ConfigMap",
                       "PodMonitor", "ScaledObject", "Job"}


def test_everything_on_deployment(chart):
    r = render(chart, EVERYTHING)
    dep = r.one("Deployment")
    assert "replicas" not in dep["spec"], "KEDA owns the replica count"
    pod = dep["spec"]["template"]["spec"]
    worker = container(pod, "worker")
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["nodeSelector"] == {"cloud.google.com/gke-accelerator": "nvidia-l4"}
    env = env_of(worker)

    # Kafka and SASL/TLS
    assert env["WORKER_BOOTSTRAP_SERVERS"] == "b-1.msk:9096,b-2.msk:9096"
    assert env["WORKER_INPUT_TOPIC"] == "camera.frames"
    assert env["WORKER_GROUP_ID"] == "labeller"
    assert env["WORKER_SECURITY_PROTOCOL"] == "SASL_SSL"
    assert env["WORKER_SASL_MECHANISM"] == "SCRAM-SHA-512"
    assert env["WORKER_SASL_USERNAME"] == "labeller"
    assert env["WORKER_SASL_PASSWORD"] == {"secretKeyRef": {"name": "kafka-user-labeller", "key": "password"}}
    assert env["WORKER_SSL_CAFILE"] == "/etc/gpu-worker/kafka-tls/ca.crt"
    assert env["WORKER_SSL_CERTFILE"] == "/etc/gpu-worker/kafka-tls/tls.crt"
    assert env["WORKER_SSL_KEYFILE"] == "/etc/gpu-worker/kafka-tls/tls.key"
    vols, mounts = volumes_by_name(pod), mounts_by_path(worker)
    tls_mount = mounts["/etc/gpu-worker/kafka-tls"]
    assert tls_mount["readOnly"] is True
    assert vols[tls_mount["name"]]["secret"]["secretName"] == "kafka-ca"

    # Worker settings
    assert env["WORKER_MAX_BATCH_SIZE"] == "64"
    assert env["WORKER_MAX_WAIT_MS"] == "2.5"
    assert env["WORKER_DECODE_WORKERS"] == "6"
    assert env["WORKER_DRAIN_TIMEOUT_S"] == "45.5"
    assert pod["terminationGracePeriodSeconds"] == 46 + 80 + 5
    assert pod["terminationGracePeriodSeconds"] > 45.5

    # Pipeline ConfigMap mounted, WORKER_PIPELINE points into it, the labels file beside it.
    cm = r.one("ConfigMap")
    assert yaml.safe_load(cm["data"]["pipeline.yaml"]) == PIPELINE
    assert cm["data"]["imagenet.txt"] == "tench\ngoldfish\n"
    pipe_mount = mounts["/etc/gpu-worker/pipeline"]
    assert vols[pipe_mount["name"]]["configMap"]["name"] == cm["metadata"]["name"]
    assert env["WORKER_PIPELINE"] == "/etc/gpu-worker/pipeline/pipeline.yaml"
    assert "checksum/pipeline" in dep["spec"]["template"]["metadata"]["annotations"]

    # Models from a PVC, read-only; engines on a shared claim.
    models = mounts["/models"]
    assert models["readOnly"] is True and models["subPath"] == "vision"
    assert vols[models["name"]]["persistentVolumeClaim"] == {"claimName": "model-store", "readOnly": True}
    engines = mounts["/var/cache/gpu-worker/engines"]
    assert vols[engines["name"]]["persistentVolumeClaim"] == {"claimName": "trt-engines"}
    assert "initContainers" not in pod


def test_podmonitor_key_fields(chart):
    r = render(chart, EVERYTHING)
    pm = r.one("PodMonitor")
    assert pm["apiVersion"] == "monitoring.coreos.com/v1"
    assert pm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert set(pm["spec"]) == {"selector", "podMetricsEndpoints"}
    [endpoint] = pm["spec"]["podMetricsEndpoints"]
    assert endpoint["port"] == "http" and endpoint["path"] == "/metrics"
    assert endpoint["interval"] == "15s"
    # It selects the worker's pods.
    pod_labels = r.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert pm["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()


def test_scaledobject_key_fields(chart):
    r = render(chart, EVERYTHING)
    so = r.one("ScaledObject")
    assert so["apiVersion"] == "keda.sh/v1alpha1"
    spec = so["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": FULLNAME}
    assert spec["minReplicaCount"] == 1
    assert spec["maxReplicaCount"] == 6
    assert spec["maxReplicaCount"] <= EVERYTHING["kafka"]["partitions"]
    [trigger] = spec["triggers"]
    assert trigger["type"] == "kafka"
    meta = trigger["metadata"]
    assert meta["bootstrapServers"] == "b-1.msk:9096,b-2.msk:9096"
    assert meta["consumerGroup"] == "labeller"
    assert meta["topic"] == "camera.frames"
    assert meta["lagThreshold"] == "500"
    assert meta["allowIdleConsumers"] == "false"
    # KEDA reads trigger metadata as strings only.
    assert all(isinstance(v, str) for v in meta.values())
    assert trigger["authenticationRef"] == {"name": "kafka-keda-auth"}


def test_replay_job(chart):
    r = render(chart, EVERYTHING)
    job = r.one("Job")
    assert job["metadata"]["name"].startswith(f"{FULLNAME}-replay-")
    assert len(job["metadata"]["name"]) <= 63
    assert job["spec"]["backoffLimit"] == 4
    assert "ttlSecondsAfterFinished" not in job["spec"]
    pod = job["spec"]["template"]["spec"]
    assert pod["restartPolicy"] == "OnFailure"
    replay = container(pod, "replay")
    assert replay["args"] == [
        "replay",
        "--from-timestamp", "2026-11-01T00:00:00Z",
        "--until-offset", "0:1000,1:2000",
        "--partitions", "0,1",
        "--output-topic", "camera.labels.v2",
        "--rate", "200",
    ]  # no --replay-group: the worker derives labeller-replay-<hash of range, output topic, models, runId>
    env = env_of(replay)
    # The live group, which the replay derives its group from and refuses to run as.
    assert env["WORKER_GROUP_ID"] == "labeller"
    assert env["WORKER_SASL_PASSWORD"] == {"secretKeyRef": {"name": "kafka-user-labeller", "key": "password"}}
    assert env["WORKER_PIPELINE"] == "/etc/gpu-worker/pipeline/pipeline.yaml"
    assert replay["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["runtimeClassName"] == "nvidia"
    assert pod["tolerations"] == r.one("Deployment")["spec"]["template"]["spec"]["tolerations"]
    assert replay["securityContext"]["readOnlyRootFilesystem"] is True
    assert pod["terminationGracePeriodSeconds"] > 45.5


@pytest.mark.parametrize("replay, args", [
    ({}, ["replay", "--from-beginning", "--until", "end"]),
    ({"runId": "again"}, ["replay", "--from-beginning", "--until", "end", "--run-id", "again"]),
    ({"from": "offsets", "fromOffsets": "0:10,3:7", "until": "timestamp", "untilTimestamp": "1767225600000",
      "groupId": "backfill-2026", "dlqTopic": "images.replay.dlq"},
     ["replay", "--from-offset", "0:10,3:7", "--until-timestamp", "1767225600000",
      "--dlq-topic", "images.replay.dlq", "--replay-group", "backfill-2026"]),
])
def test_replay_args_variants(chart, replay, args):
    r = render(chart, BASE, {"replay": {"enabled": True, **replay}})
    validate_all(r)
    assert container(r.one("Job")["spec"]["template"]["spec"], "replay")["args"] == args


def test_replay_job_name_follows_its_spec(chart):
    """Same values: same Job (an upgrade leaves it alone); changed replay: a new Job (pod specs are immutable)."""
    def name(extra):
        return render(chart, BASE, {"replay": {"enabled": True, **extra}}).one("Job")["metadata"]["name"]

    assert name({}) == name({})
    assert name({}) != name({"rate": 10})
    assert name({}) != name({"runId": "again"})


def test_models_from_image(chart):
    r = render(chart, BASE, {"models": {"source": "image",
                                        "image": {"repository": "registry.example.com/models/vision",
                                                  "tag": "2026-11-01", "path": "/opt/models"}}})
    validate_all(r)
    pod = r.one("Deployment")["spec"]["template"]["spec"]
    [init] = pod["initContainers"]
    assert init["image"] == "registry.example.com/models/vision:2026-11-01"
    assert env_of(init)["MODELS_SRC"] == "/opt/models"
    vols = volumes_by_name(pod)
    [init_mount] = init["volumeMounts"]
    assert "emptyDir" in vols[init_mount["name"]]
    assert init["securityContext"]["readOnlyRootFilesystem"] is True
    worker_mount = mounts_by_path(container(pod, "worker"))["/models"]
    assert worker_mount["name"] == init_mount["name"] and worker_mount["readOnly"] is True


def test_models_from_url(chart):
    digest = "a" * 64
    r = render(chart, BASE, {"models": {"source": "url", "url": {"files": [
        {"url": "https://models.example.com/resnet50.onnx", "filename": "resnet50.onnx", "sha256": digest},
        {"url": "https://models.example.com/imagenet.txt", "filename": "imagenet.txt"},
    ]}}})
    validate_all(r)
    pod = r.one("Deployment")["spec"]["template"]["spec"]
    [init] = pod["initContainers"]
    assert init["image"] == "curlimages/curl:8.11.1"
    # URLs travel as arguments (url, file name, sha256 or "-"), never pasted into the script.
    assert init["args"] == ["https://models.example.com/resnet50.onnx", "resnet50.onnx", digest,
                            "https://models.example.com/imagenet.txt", "imagenet.txt", "-"]
    assert "https://" not in init["command"][2]
    assert "sha256sum -c" in init["command"][2]
    worker_mount = mounts_by_path(container(pod, "worker"))["/models"]
    assert "emptyDir" in volumes_by_name(pod)[worker_mount["name"]]


def test_explicit_grace_period_above_drain_is_kept(chart):
    dep = render(chart, BASE, {"terminationGracePeriodSeconds": 90}).one("Deployment")
    assert dep["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 90


def test_tls_only_without_client_certificate(chart):
    r = render(chart, BASE, {"kafka": {"security": {"protocol": "SSL", "tls": {"secretName": "kafka-ca"}}}})
    validate_all(r)
    env = env_of(container(r.one("Deployment")["spec"]["template"]["spec"], "worker"))
    assert env["WORKER_SSL_CAFILE"] == "/etc/gpu-worker/kafka-tls/ca.crt"
    assert "WORKER_SSL_CERTFILE" not in env and "WORKER_SASL_PASSWORD" not in env


# --- values the templates refuse (checks across two values) ------------------------------------------


@pytest.mark.parametrize("values, message", [
    ({"keda": {"enabled": True, "maxReplicas": 13}}, "keda.maxReplicas=13 exceeds kafka.partitions=12"),
    ({"kafka": {"partitions": 3}, "replicaCount": 4}, "replicaCount=4 exceeds kafka.partitions=3"),
    ({"terminationGracePeriodSeconds": 20}, "must be above worker.drainTimeoutSeconds=20"),
    ({"terminationGracePeriodSeconds": 30, "worker": {"drainTimeoutSeconds": 60}},
     "must be above worker.drainTimeoutSeconds=60"),
    ({"replay": {"enabled": True, "groupId": "gpu-worker"}}, "is the live consumer group"),
    ({"kafka": {"security": {"protocol": "SSL", "tls": {"certKey": "tls.crt", "keyKey": "tls.key"}}}},
     "(mutual TLS) need kafka.security.tls.secretName"),
    ({"progressDeadlineSeconds": 1200}, "progressDeadlineSeconds=1200 is not above the startup probe's window"),
    ({"resources": {"limits": {"memory": "12Gi"}}}, "(8 intakes) for messages in flight (under 64 MiB)"),
    ({"kafka": {"security": {"protocol": "SASL_SSL", "sasl": {"username": "u"},
                             "tls": {"secretName": "kafka-ca"}}}},
     "needs kafka.security.sasl.passwordSecret.name"),
    ({"kafka": {"security": {"tls": {"certKey": "tls.crt"}}}}, "certKey and kafka.security.tls.keyKey go together"),
    ({"gpu": {"count": 2}, "worker": {"gpuDeviceIndex": 1}}, "worker.gpuDeviceIndex=1 with gpu.count=2"),
    ({"gpu": {"count": 2}, "worker": {"device": "cpu"}}, "gpu.count=2 with worker.device=cpu"),
])
def test_templates_fail_with_a_clear_message(chart, values, message):
    with pytest.raises(helm.HelmRenderError) as exc:
        render(chart, BASE, values)
    assert message in str(exc.value)


# --- values the schema rejects -----------------------------------------------------------------------


@pytest.mark.parametrize("values, where", [
    (None, "/kafka/bootstrapServers"),  # missing bootstrap servers (the chart's default is empty)
    ({"kafka": {"bootstrapServers": "kafka"}}, "/kafka/bootstrapServers"),  # no port
    ({"worker": {"maxBatchSize": 0}}, "/worker/maxBatchSize"),
    ({"worker": {"maxBatchSize": -8}}, "/worker/maxBatchSize"),
    ({"worker": {"maxBatchSize": "32"}}, "/worker/maxBatchSize"),  # wrong type
    ({"worker": {"maxWaitMs": "5ms"}}, "/worker/maxWaitMs"),
    ({"worker": {"device": "tpu"}}, "/worker/device"),
    ({"gpu": {"count": 0}}, "/gpu/count"),
    ({"models": {"source": "s3"}}, "/models/source"),
    ({"models": {"source": "pvc"}}, "/models/pvc/claimName"),
    ({"models": {"source": "image", "image": {"repository": "models"}}}, "/models/image/tag"),
    ({"models": {"source": "url"}}, "/models/url/files"),
    ({"models": {"source": "url", "url": {"files": [{"url": "ftp://x/m.onnx", "filename": "m.onnx"}]}}},
     "/models/url/files/0/url"),
    ({"models": {"source": "url", "url": {"files": [
        {"url": "https://x/m.onnx", "filename": "m.onnx", "sha256": "abc"}]}}}, "/models/url/files/0/sha256"),
    ({"models": {"source": "url", "url": {"files": [{"url": "https://x/m.onnx", "filename": "../etc/m"}]}}},
     "/models/url/files/0/filename"),
    ({"kafka": {"partitions": 0}}, "/kafka/partitions"),
    ({"kafka": {"security": {"protocol": "SASL"}}}, "/kafka/security/protocol"),
    ({"kafka": {"security": {"protocol": "SASL_SSL", "tls": {"secretName": "ca"},
                             "sasl": {"passwordSecret": {"name": "pw"}}}}}, "/kafka/security/sasl/username"),
    ({"gpu": {"count": 9}}, "/gpu/count"),  # nodes carry up to 8
    ({"kafka": {"security": {"protocol": "SASL_SSL", "sasl": {"mechanism": "GSSAPI"}}}},
     "/kafka/security/sasl/mechanism"),
    ({"kafka": {"security": {"protocol": "SASL_SSL", "sasl": {"mechanism": "OAUTHBEARER"}}}},
     "/kafka/security/sasl/mechanism"),
    ({"worker": {"intakeProcesses": -1}}, "/worker/intakeProcesses"),
    ({"sharedMemory": {"overflowPerIntake": "lots"}}, "/sharedMemory/overflowPerIntake"),
    ({"keda": {"maxReplicas": 0}}, "/keda/maxReplicas"),
    ({"probes": {"startup": {"path": "healthz"}}}, "/probes/startup/path"),
    ({"terminationGracePeriodSeconds": "60"}, "/terminationGracePeriodSeconds"),
    ({"replay": {"from": "offsets"}}, "/replay/fromOffsets"),
    ({"replay": {"from": "timestamp", "fromTimestamp": "yesterday"}}, "/replay/fromTimestamp"),
    ({"replay": {"until": "forever"}}, "/replay/until"),
    ({"replay": {"rate": -1}}, "/replay/rate"),
    ({"replay": {"partitions": ["0"]}}, "/replay/partitions/0"),
    ({"pipeline": {"model": []}}, "/pipeline"),  # a pipeline needs a models list
    ({"pipelineFiles": {"pipeline.yaml": "x"}}, "invalid propertyName 'pipeline.yaml'"),
    ({"replicas": 3}, "additional properties 'replicas' not allowed"),  # unknown top-level key (typo)
    ({"worker": {"batchSize": 8}}, "additional properties 'batchSize' not allowed"),
])
def test_schema_rejects_bad_values(chart, values, where):
    with pytest.raises(helm.HelmValuesError) as exc:
        render(chart) if values is None else render(chart, BASE, values)
    assert where in str(exc.value)


def test_schema_accepts_the_documented_examples(chart):
    chart.validate_schema(merge(chart.values, EVERYTHING))
    chart.validate_schema(merge(chart.values, BASE, {"podDisruptionBudget": {"minAvailable": "50%"}}))


def test_pdb_min_available_replaces_max_unavailable(chart):
    r = render(chart, BASE, {"podDisruptionBudget": {"minAvailable": "50%"}})
    validate_all(r)
    assert r.one("PodDisruptionBudget")["spec"] == {
        "minAvailable": "50%", "unhealthyPodEvictionPolicy": "AlwaysAllow",
        "selector": r.one("PodDisruptionBudget")["spec"]["selector"]}


# --- the process model: /dev/shm, intakes, memory -----------------------------------------------------

MiB, GiB = 1 << 20, 1 << 30


def worker_pod(r: Rendered) -> tuple[dict[str, Any], dict[str, Any]]:
    pod = r.one("Deployment")["spec"]["template"]["spec"]
    return pod, container(pod, "worker")


def test_dev_shm_is_a_memory_emptydir_sized_for_every_intake(chart):
    pod, worker = worker_pod(render(chart, BASE))
    shm = mounts_by_path(worker)["/dev/shm"]
    vol = volumes_by_name(pod)[shm["name"]]
    # No CPU limit: the worker may derive up to 8 intakes; each 256 slots x 256 KiB + 128 MiB of large images.
    assert vol["emptyDir"] == {"medium": "Memory", "sizeLimit": f"{8 * (64 + 128)}Mi"}
    env = env_of(worker)
    assert env["WORKER_INTAKE_PROCESSES"] == "0"  # derived by the worker from the cgroup quota
    assert env["WORKER_IPC_SLOTS"] == "256" and env["WORKER_IPC_SLOT_BYTES"] == "262144"
    # 16Gi: (16 GiB - 4 GiB GPU process) / 8 - 1 GiB baseline - 128 MiB large images = 384 MiB per intake.
    assert env["WORKER_MAX_IN_FLIGHT_BYTES"] == str(384 * MiB)


def test_intake_processes_set_explicitly(chart):
    pod, worker = worker_pod(render(chart, BASE, {"worker": {"intakeProcesses": 2, "ipcSlots": 128},
                                                  "sharedMemory": {"overflowPerIntake": "64Mi"}}))
    env = env_of(worker)
    assert env["WORKER_INTAKE_PROCESSES"] == "2"
    assert env["WORKER_IPC_SLOTS"] == "128"
    vol = volumes_by_name(pod)[mounts_by_path(worker)["/dev/shm"]["name"]]
    assert vol["emptyDir"]["sizeLimit"] == f"{2 * (32 + 64)}Mi"
    # (16 GiB - 4 GiB) / 2 - 1 GiB - 64 MiB
    assert env["WORKER_MAX_IN_FLIGHT_BYTES"] == str(5 * GiB - 64 * MiB)


@pytest.mark.parametrize("cpu, cpus", [("1", 1), ("2", 2), ("2500m", 3), ("4", 4), (7, 7), ("16", 16), ("64", 64)])
def test_dev_shm_follows_the_intakes_the_worker_derives_from_a_cpu_limit(chart, cpu, cpus):
    from worker.policy.cpus import intake_processes_for  # the worker's own rule: the chart must agree

    intakes = intake_processes_for(cpus)
    pod, worker = worker_pod(render(chart, BASE, {"resources": {"limits": {"cpu": cpu, "memory": "32Gi"}}}))
    vol = volumes_by_name(pod)[mounts_by_path(worker)["/dev/shm"]["name"]]
    assert vol["emptyDir"]["sizeLimit"] == f"{intakes * 192}Mi"
    assert env_of(worker)["WORKER_MAX_IN_FLIGHT_BYTES"] == str((28 * GiB) // intakes - GiB - 128 * MiB)


def test_ephemeral_storage_requested_for_the_disk_emptydirs(chart):
    _, worker = worker_pod(render(chart, BASE))
    # /tmp 2Gi + engine cache 10Gi + model cache 2Gi (/dev/shm is memory)
    assert worker["resources"]["requests"]["ephemeral-storage"] == f"{14 * 1024}Mi"
    pod, worker = worker_pod(render(chart, BASE, {
        "engineCache": {"existingClaim": "trt"}, "modelCache": {"sizeLimit": "1Gi"},
        "models": {"source": "url", "url": {"files": [{"url": "https://x/m.onnx", "filename": "m.onnx"}]}}}))
    assert worker["resources"]["requests"]["ephemeral-storage"] == f"{(2 + 1 + 20) * 1024}Mi"
    vols = volumes_by_name(pod)
    assert vols[mounts_by_path(worker)["/var/cache/gpu-worker/models"]["name"]]["emptyDir"]["sizeLimit"] == "1Gi"
    _, worker = worker_pod(render(chart, BASE, {"resources": {"requests": {"ephemeral-storage": "50Gi"}}}))
    assert worker["resources"]["requests"]["ephemeral-storage"] == "50Gi"


# --- rollout, disruption, placement -------------------------------------------------------------------


def test_progress_deadline_covers_the_startup_probe(chart):
    dep = render(chart, BASE).one("Deployment")
    assert dep["spec"]["progressDeadlineSeconds"] == 1200 + 600
    dep = render(chart, BASE, {"probes": {"startup": {"failureThreshold": 360}}}).one("Deployment")
    assert dep["spec"]["progressDeadlineSeconds"] == 3600 + 600
    dep = render(chart, BASE, {"progressDeadlineSeconds": 1500}).one("Deployment")
    assert dep["spec"]["progressDeadlineSeconds"] == 1500


def test_pdb_lets_unhealthy_pods_be_evicted(chart):
    r = render(chart, BASE)
    validate_all(r)
    assert r.one("PodDisruptionBudget")["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_soft_spread_across_nodes(chart):
    dep = render(chart, BASE).one("Deployment")
    [spread] = dep["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["whenUnsatisfiable"] == "ScheduleAnyway"
    assert spread["labelSelector"]["matchLabels"] == dep["spec"]["selector"]["matchLabels"]
    dep = render(chart, BASE, {"spreadAcrossNodes": False}).one("Deployment")
    assert "topologySpreadConstraints" not in dep["spec"]["template"]["spec"]


# --- KEDA: threshold, scale-down, authentication ------------------------------------------------------


def scaled_object(r: Rendered) -> tuple[dict[str, Any], dict[str, Any]]:
    so = r.one("ScaledObject")
    [trigger] = so["spec"]["triggers"]
    return so, trigger


def test_keda_lag_threshold_is_what_one_pod_carries_while_keeping_up(chart):
    r = render(chart, BASE, {"keda": {"enabled": True}})
    _, trigger = scaled_object(r)
    # 2000/s x 1 s commit interval + 8 intakes x 1024 in flight
    assert trigger["metadata"]["lagThreshold"] == "10192"
    assert "target 10192 per replica" in r.notes
    _, trigger = scaled_object(render(chart, BASE, {
        "keda": {"enabled": True, "replicaRate": 1500},
        "worker": {"intakeProcesses": 2, "maxInFlight": 256, "commitIntervalMs": 2000}}))
    assert trigger["metadata"]["lagThreshold"] == str(3000 + 512)
    _, trigger = scaled_object(render(chart, BASE, {"keda": {"enabled": True, "lagThreshold": 700}}))
    assert trigger["metadata"]["lagThreshold"] == "700"


def test_keda_scale_down_behaviour(chart):
    so, _ = scaled_object(render(chart, BASE, {"keda": {"enabled": True}}))
    down = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"]
    assert down == {"stabilizationWindowSeconds": 600, "selectPolicy": "Min",
                    "policies": [{"type": "Pods", "value": 1, "periodSeconds": 300}]}
    own = {"stabilizationWindowSeconds": 60}
    so, _ = scaled_object(render(chart, BASE, {"keda": {"enabled": True, "advanced": {
        "restoreToOriginalReplicaCount": True,
        "horizontalPodAutoscalerConfig": {"behavior": {"scaleDown": own}}}}}))
    assert so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]["scaleDown"] == own
    assert so["spec"]["advanced"]["restoreToOriginalReplicaCount"] is True


def test_tls_with_the_system_cas_needs_no_secret(chart):
    r = render(chart, BASE, {"kafka": {"security": {"protocol": "SSL"}}, "keda": {"enabled": True}})
    validate_all(r)
    pod, worker = worker_pod(r)
    env = env_of(worker)
    assert env["WORKER_SECURITY_PROTOCOL"] == "SSL"
    assert not any(k.startswith("WORKER_SSL") for k in env)
    assert "/etc/gpu-worker/kafka-tls" not in mounts_by_path(worker)
    assert not any("secret" in v for v in pod["volumes"])
    _, trigger = scaled_object(r)
    assert trigger["metadata"]["tls"] == "enable"
    assert "authenticationRef" not in trigger and "TriggerAuthentication" not in r.kinds


def test_keda_authentication_generated_from_the_workers_secrets(chart):
    r = render(chart, BASE, {"keda": {"enabled": True}, "kafka": {"security": {
        "protocol": "SASL_SSL",
        "sasl": {"mechanism": "SCRAM-SHA-256", "username": "labeller",
                 "passwordSecret": {"name": "kafka-user", "key": "pw"}},
        "tls": {"secretName": "kafka-tls", "caKey": "ca.pem", "certKey": "tls.crt", "keyKey": "tls.key",
                "keyPasswordSecret": {"name": "kafka-keypass", "key": "pass"}}}}})
    validate_all(r)
    auth = r.one("TriggerAuthentication")
    assert auth["apiVersion"] == "keda.sh/v1alpha1"
    refs = {x["parameter"]: (x["name"], x["key"]) for x in auth["spec"]["secretTargetRef"]}
    assert refs == {"password": ("kafka-user", "pw"), "ca": ("kafka-tls", "ca.pem"),
                    "cert": ("kafka-tls", "tls.crt"), "key": ("kafka-tls", "tls.key"),
                    "keyPassword": ("kafka-keypass", "pass")}
    assert auth["spec"]["env"] == [{"parameter": "username", "name": "WORKER_SASL_USERNAME", "containerName": "worker"}]
    _, worker = worker_pod(r)
    assert env_of(worker)["WORKER_SASL_USERNAME"] == "labeller"
    _, trigger = scaled_object(r)
    assert trigger["authenticationRef"] == {"name": auth["metadata"]["name"]}
    assert trigger["metadata"]["sasl"] == "scram_sha256" and trigger["metadata"]["tls"] == "enable"


def test_keda_authentication_sasl_plain_without_tls(chart):
    r = render(chart, BASE, {"keda": {"enabled": True}, "kafka": {"security": {
        "protocol": "SASL_PLAINTEXT",
        "sasl": {"mechanism": "PLAIN", "username": "u", "passwordSecret": {"name": "kafka-user"}},
        "tls": {"secretName": "ignored-without-tls"}}}})
    auth = r.one("TriggerAuthentication")
    assert [x["parameter"] for x in auth["spec"]["secretTargetRef"]] == ["password"]
    _, trigger = scaled_object(r)
    assert trigger["metadata"]["sasl"] == "plaintext" and "tls" not in trigger["metadata"]


def test_keda_authentication_ref_of_your_own_wins(chart):
    r = render(chart, EVERYTHING)
    assert "TriggerAuthentication" not in r.kinds
    _, trigger = scaled_object(r)
    assert trigger["authenticationRef"] == {"name": "kafka-keda-auth"}


def test_sasl_mechanisms_are_the_ones_the_worker_supports(chart):
    """The chart offers exactly what the worker accepts; OAUTHBEARER and GSSAPI fail at load, not at start."""
    import json

    from worker.errors import ConfigError
    from worker.settings import load

    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    offered = schema["properties"]["kafka"]["properties"]["security"]["properties"]["sasl"]["properties"]
    assert offered["mechanism"]["enum"] == ["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]
    for mechanism in offered["mechanism"]["enum"]:
        assert load(environ={"WORKER_SASL_MECHANISM": mechanism}).sasl_mechanism == mechanism
    for mechanism in ("OAUTHBEARER", "GSSAPI"):
        with pytest.raises(ConfigError, match=f"sasl_mechanism='{mechanism}' is not one of"):
            load(environ={"WORKER_SASL_MECHANISM": mechanism})


def test_dashboard_and_rules_render_valid_objects(chart):
    r = render(chart, BASE, {"grafanaDashboard": {"enabled": True}, "prometheusRule": {"enabled": True}})
    validate_all(r)
    assert {"ConfigMap", "PrometheusRule"} <= r.kinds
    assert r.one("PrometheusRule")["apiVersion"] == "monitoring.coreos.com/v1"
    rules = {rule["alert"]: rule for g in r.one("PrometheusRule")["spec"]["groups"] for rule in g["rules"]}
    for name, rule in rules.items():  # every expression is PromQL a Prometheus would load
        try:
            promql_parser.parse(rule["expr"])
        except ValueError as exc:
            pytest.fail(f"{name}: {exc}\n{rule['expr']}")
    with pytest.raises(ValueError):  # and the parser is strict enough to catch a slip
        promql_parser.parse(rules["GpuWorkerPartitionsUneven"]["expr"] + ")")
    uneven = rules["GpuWorkerPartitionsUneven"]["expr"]
    # partitions per intake process (pod x process), compared across the live group, only while it lags
    assert uneven.count("count by (namespace, group, pod, process) (worker_consumer_lag_messages{") == 2
    assert 'group="' in uneven and uneven.count("(") == uneven.count(")")


# --- several GPUs per pod ------------------------------------------------------------------------------


def test_one_gpu_pod_names_no_device_list(chart):
    env = env_of(container(render(chart, BASE).one("Deployment")["spec"]["template"]["spec"], "worker"))
    assert "WORKER_GPU_DEVICES" not in env  # the one-GPU worker: gpu_device_index alone, as before
    assert env["WORKER_GPU_DEVICE_INDEX"] == "0"


@pytest.mark.parametrize("count, devices", [(2, "0,1"), (4, "0,1,2,3"), (8, "0,1,2,3,4,5,6,7")])
def test_several_gpus_per_pod_get_a_gpu_process_each(chart, count, devices):
    r = render(chart, BASE, {"gpu": {"count": count}, "replay": {"enabled": True}})
    validate_all(r)
    for kind, name in (("Deployment", "worker"), ("Job", "replay")):
        obj = r.one(kind)
        pod = obj["spec"]["template"]["spec"]
        c = container(pod, name)
        assert c["resources"]["limits"]["nvidia.com/gpu"] == count
        assert env_of(c)["WORKER_GPU_DEVICES"] == devices, kind


def test_processing_guarantee_reaches_the_worker_as_its_setting(chart):
    from worker.settings import ProcessingGuarantee, load

    _, worker = worker_pod(render(chart, BASE))
    assert env_of(worker)["WORKER_PROCESSING_GUARANTEE"] == "at-least-once"
    _, worker = worker_pod(render(chart, BASE, {"worker": {"processingGuarantee": "exactly-once"}}))
    env = env_of(worker)
    assert load(environ=env).processing_guarantee is ProcessingGuarantee.EXACTLY_ONCE
    with pytest.raises(helm.HelmValuesError) as exc:
        render(chart, BASE, {"worker": {"processingGuarantee": "exactly_once"}})
    assert "/worker/processingGuarantee" in str(exc.value)
