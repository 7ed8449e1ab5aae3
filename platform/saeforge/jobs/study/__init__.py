"""`saeforge study`.

driver.py   L0 matching rounds, the final SAEs, the verdicts and the report
trial.py    one SAE of a study (a Tune trial): train in its process, save, evaluate, log
"""
