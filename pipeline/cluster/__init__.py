"""Training on a Kubernetes cluster: the pod and Kubeflow job manifests (`pod`, `jobs`) and the launcher that
submits a job and watches it (`launch`). No Airflow here: the nightly `train` stage (and so `flywheel train`)
submits a job through it, and `pipeline.orchestration` wraps the single pod in a KubernetesPodOperator."""
