"""The night's training rendered as each kind of Kubernetes job, validated without a cluster:

- the single pod (with its Kueue label) by kubernetes-validate, as every core manifest here;
- the Kubeflow Trainer `TrainJob` by the typed API models the registry ships (`kubeflow-trainer-api`, pinned);
- the elastic `PyTorchJob`: the training-operator SDK (`kubeflow-training` 1.9.4) requires kubernetes<36 and cannot
  be installed beside the pinned kubernetes 36, so its job-level fields are checked against an excerpt of the CRD's
  openAPIV3Schema vendored in tests/data/schemas, and its pod template (a core PodTemplateSpec) by
  kubernetes-validate;
- Kueue ships no schema package: the fields infra/kueue/queues.yaml and the jobs use are checked against the
  v1beta1 API as documented (kueue.sigs.k8s.io concepts pages and examples: ResourceFlavor, ClusterQueue,
  LocalQueue; the `kueue.x-k8s.io/queue-name` label).
"""

from __future__ import annotations

import json

import pytest
import yaml

from pipeline.cluster import jobs as k8s_jobs
from pipeline.config import REPO
from tests.helpers import free_port, make_settings
from tests.unit.test_infra import _validate

DAY = "2026-03-01"
STAGED = "s3://flywheel/staging/flywheel-loans/2026-03-01-v3-0123456789abcdef"
KUEUE_FIELDS = {  # kueue.x-k8s.io/v1beta1, as documented; only what a manifest here may use
    "ResourceFlavor": {"spec": {"nodeLabels", "nodeTaints", "tolerations", "topologyName"}},
    "ClusterQueue": {"spec": {"namespaceSelector", "cohort", "queueingStrategy", "resourceGroups", "preemption",
                              "flavorFungibility", "stopPolicy", "fairSharing"},
                     "resourceGroup": {"coveredResources", "flavors"}, "flavor": {"name", "resources"},
                     "resource": {"name", "nominalQuota", "borrowingLimit", "lendingLimit"},
                     "preemption": {"reclaimWithinCohort", "withinClusterQueue", "borrowWithinCohort"}},
    "LocalQueue": {"spec": {"clusterQueue"}},
}
KUEUE_ENUMS = {"queueingStrategy": {"StrictFIFO", "BestEffortFIFO"},
               "reclaimWithinCohort": {"Never", "LowerPriority", "Any"},
               "withinClusterQueue": {"Never", "LowerPriority", "LowerOrNewerEqualPriority"}}


@pytest.fixture
def settings(tmp_path):
    return make_settings(tmp_path, free_port(), training_min_nodes=1, training_max_nodes=4, training_gpus=2,
                         training_max_restarts=50, kueue_queue="flywheel-training", training_namespace="ml",
                         checkpoint_uri="s3://flywheel/checkpoints", training_deadline_h=6)


def test_pytorchjob_is_elastic_queued_and_matches_the_crd(settings, tmp_path):
    import jsonschema

    job = k8s_jobs.training_job(settings.model_copy(update={"training_job_kind": "pytorchjob"}), DAY, STAGED)
    schema = json.loads((REPO / "tests" / "data" / "schemas" / "pytorchjob-v1-excerpt.json").read_text())
    jsonschema.validate(job, schema)
    spec = job["spec"]
    assert spec["elasticPolicy"] | {} == {"minReplicas": 1, "maxReplicas": 4, "rdzvBackend": "c10d",
                                          "rdzvPort": 29400, "maxRestarts": 50}
    assert job["metadata"]["labels"][k8s_jobs.QUEUE_LABEL] == "flywheel-training"
    assert spec["runPolicy"]["activeDeadlineSeconds"] == 6 * 3600
    worker = spec["pytorchReplicaSpecs"]["Worker"]
    assert worker["replicas"] == 4 and worker["restartPolicy"] == "ExitCode"
    container = worker["template"]["spec"]["containers"][0]
    assert container["name"] == "pytorch" and container["command"][:2] == ["torchrun", "--nnodes=1:4"]
    assert "--rdzv-backend=c10d" in container["command"] and "--max-restarts=50" in container["command"]
    assert container["args"][:2] == ["-m", "pipeline.learn.ddp_train"]
    assert {"name": "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "value": "1"} in container["env"]  # re-join works
    assert container["args"] == ["-m", "pipeline.learn.ddp_train", "--staged", STAGED]
    assert job["metadata"]["name"].startswith(f"flywheel-train-{DAY}-")
    assert worker["template"]["spec"]["priorityClassName"] == "flywheel-training"
    pod = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "w", **worker["template"]["metadata"]},
           "spec": worker["template"]["spec"]}
    (tmp_path / "pod.yaml").write_text(yaml.safe_dump(pod))
    out = _validate(tmp_path / "pod.yaml")
    assert out.returncode == 0, out.stdout + out.stderr
    job["spec"]["elasticPolicy"]["minReplica"] = 1  # a typo the excerpt must catch
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(job, schema)


def test_trainjob_round_trips_through_the_trainer_api_models(settings):
    from kubeflow_trainer_api.models import TrainerV1alpha1TrainJob

    job = k8s_jobs.training_job(settings.model_copy(update={"training_job_kind": "trainjob"}), DAY, STAGED)
    typed = TrainerV1alpha1TrainJob.from_dict(job)
    assert typed.to_dict() == job, "a field the API model does not know was dropped"
    assert typed.spec.trainer.num_nodes == 4 and typed.spec.runtime_ref.name == "torch-distributed"
    assert typed.spec.trainer.resources_per_node.requests["nvidia.com/gpu"].actual_instance == "2"
    assert typed.metadata.labels[k8s_jobs.QUEUE_LABEL] == "flywheel-training"
    assert {"name": "TORCH_DISABLE_SHARE_RDZV_TCP_STORE", "value": "1"} in job["spec"]["trainer"]["env"]
    assert typed.spec.trainer.command[-2:] == ["--staged", STAGED]
    job["spec"]["trainer"]["numNodes"] = "four"
    with pytest.raises(ValueError):
        TrainerV1alpha1TrainJob.from_dict(job)


def test_queued_pod_carries_the_kueue_label_and_passes_validation(settings, tmp_path):
    pod = k8s_jobs.training_job(settings, DAY)
    assert pod["kind"] == "Pod" and pod["metadata"]["labels"][k8s_jobs.QUEUE_LABEL] == "flywheel-training"
    (tmp_path / "pod.yaml").write_text(yaml.safe_dump(pod))
    out = _validate(tmp_path / "pod.yaml")
    assert out.returncode == 0, out.stdout + out.stderr
    unqueued = k8s_jobs.training_job(settings.model_copy(update={"kueue_queue": None}), DAY)
    assert k8s_jobs.QUEUE_LABEL not in unqueued["metadata"]["labels"]


def test_kueue_example_uses_only_documented_v1beta1_fields(settings):
    docs = list(yaml.safe_load_all((REPO / "infra" / "kueue" / "queues.yaml").read_text()))
    kinds = {d["kind"]: d for d in docs}
    assert set(kinds) == {"ResourceFlavor", "ClusterQueue", "LocalQueue"}
    for d in docs:
        assert d["apiVersion"] == "kueue.x-k8s.io/v1beta1"
        assert set(d["spec"]) <= KUEUE_FIELDS[d["kind"]]["spec"], d["kind"]
    cq = kinds["ClusterQueue"]["spec"]
    fields = KUEUE_FIELDS["ClusterQueue"]
    for group in cq["resourceGroups"]:
        assert set(group) <= fields["resourceGroup"]
        for flavor in group["flavors"]:
            assert set(flavor) <= fields["flavor"] and flavor["name"] == kinds["ResourceFlavor"]["metadata"]["name"]
            for r in flavor["resources"]:
                assert set(r) <= fields["resource"] and r["name"] in group["coveredResources"]
    assert set(cq["preemption"]) <= fields["preemption"]
    for key, allowed in KUEUE_ENUMS.items():
        value = cq.get(key, cq["preemption"].get(key))
        assert value is None or value in allowed, (key, value)
    local = kinds["LocalQueue"]
    assert local["spec"]["clusterQueue"] == kinds["ClusterQueue"]["metadata"]["name"]
    assert local["metadata"]["name"] == settings.cluster.kueue_queue  # the queue the jobs name


def test_job_condition_reads_the_operators_status():
    from pipeline.cluster.launch import condition

    def c(kind: str, status: str = "True", at: str = "2026-03-01T00:00:00Z", **extra: str) -> dict:
        return {"type": kind, "status": status, "lastTransitionTime": at, **extra}

    assert condition({}) == ("Pending", "", "")
    restarting = {"conditions": [c("Created"), c("Running", "False", "2026-03-01T00:01:00Z"),
                                 c("Restarting", at="2026-03-01T00:02:00Z", reason="PyTorchJobRestarting",
                                   message="worker-1 exited with code 143")]}
    assert condition({"status": restarting}) == ("Restarting", "PyTorchJobRestarting", "worker-1 exited with code 143")
    # A terminal condition wins over a later-stamped one (the operator may touch Running after it).
    done = {"conditions": [c("Created"), c("Complete", at="2026-03-01T00:05:00Z"),
                           c("Running", at="2026-03-01T00:06:00Z")]}
    assert condition({"status": done})[0] == "Complete"
    failed = {"conditions": [c("Running"), c("Failed", reason="BackoffLimitExceeded", message="3 restarts")]}
    assert condition({"status": failed}) == ("Failed", "BackoffLimitExceeded", "3 restarts")
