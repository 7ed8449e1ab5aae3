"""The Ray-free core: model loading and hooks, corpus, batches, the training loop, metrics,
evaluation, SAE files and reporting. Nothing here imports Ray or MLflow, so it is tested in
milliseconds and usable from a notebook; `saeforge.jobs` builds the distributed runs on it."""
