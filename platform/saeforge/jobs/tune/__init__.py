"""`saeforge tune`.

driver.py         the searches: one Tuner per variant and hook, trial rows, the best registered
search_space.py   tune-space YAML: parse, validate, objective, constraints, Pareto set
trial.py          one Tune trial: train (in its process or a TorchTrainer), evaluate, report
"""
