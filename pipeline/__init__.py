"""The nightly loop's stages, each a plain function that Airflow tasks and the `flywheel` CLI both call."""
