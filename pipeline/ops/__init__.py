"""Local processes: starting and stopping MLflow, Airflow and the model server for one home, and the Airflow
REST client the demo and tests drive the scheduler with."""
