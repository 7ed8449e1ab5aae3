"""`saeforge train`.

driver.py        the run: validate, Ray, MLflow runs, train, evaluate, register
worker.py        the training loop of a Ray Train worker (or a one-worker trial's process)
trainer.py       the one TorchTrainer factory (train, and Tune trials of several workers)
checkpoints.py   checkpoint folders and run.json; the checkpoint to resume from
"""
