"""What `saeforge study` computes without Ray or MLflow.

claims.py     the seed papers' claims, statistics over seeds, the verdict logic
l0_match.py   the next sparsity factor towards a target L0 (pure numbers)
report.py     a study's tables, plots and Markdown report
"""
