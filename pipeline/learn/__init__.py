"""The model and how it learns: the embedding+MLP bundle (safetensors), the training loop, replay, checkpoints,
the holdout split, DDP and the MLflow pyfunc wrapper. Shared by the stages and by `serving/` (the model is the
kernel both sides load); imports no Airflow and no stage."""
