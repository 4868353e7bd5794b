"""The nightly loop, one module per Airflow task: each stage is one function that takes plain values (a day,
a run id, a version) and returns a small pydantic result. The DAG, `flywheel <stage>` and `stages.nightly` call
the same functions, in the order `sequence.NIGHTLY` declares once. Stages may import `checks`, `learn`,
`registry` and `feature_store`; never `orchestration`."""
