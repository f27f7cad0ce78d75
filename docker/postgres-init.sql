-- Runs once, on an empty Postgres volume: MLflow's store beside Dagster's (POSTGRES_DB=dagster).
CREATE DATABASE mlflow;
