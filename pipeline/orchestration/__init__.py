"""What `dags/` imports: task bodies (one stage call each), the deferrable review trigger, and the Kubernetes
training pod. Imported at DAG-parse time, so module tops stay free of pandas, torch, mlflow and GE."""
