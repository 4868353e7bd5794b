-- Runs once, on the first start of an empty PostgreSQL volume: MLflow's metadata lives beside Airflow's.
CREATE DATABASE mlflow OWNER flywheel;
