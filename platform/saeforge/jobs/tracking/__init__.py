"""MLflow.

store.py              the tracking URI, the store's lock, experiments, redaction
mlflow_runs.py        runs and child runs: open, log, finish, close; training curves
registry.py           logging and registering an SAE; the champion rule
registered_model.py   the SAE as an MLflow pyfunc (models-from-code)
"""
