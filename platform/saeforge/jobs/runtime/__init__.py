"""Ray around every run.

ray_cluster.py      connecting to Ray (and SIGTERM as Ctrl-C); sharing GPUs and cores
storage.py          --storage: local folders and URIs, run folders, checkpoints
failures.py         a run that failed inside Ray, told in one line
progress_board.py   progress lines from the workers to the driver
faults.py           the fault tests' hook (crash or hang at a step or batch)
"""
