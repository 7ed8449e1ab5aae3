"""`saeforge bench`: benchmarks that print ratios measured side by side in one run (figures and
their history: docs/benchmarks.md). The CLI -> bench -> jobs -> core: nothing in jobs imports it.

  modes.py         which bench the flags ask for (one at a time)
  stages.py        every stage's throughput, plain process vs Ray (no mode flag)
  same_work.py     --same-work: a plain loop and `saeforge train` on the same work, timed whole
  layers.py        --layers: one run of k layers against one run per layer
  search.py        --search N: a search against its trials as separate runs
  per_variant.py   --variants, --step-cost: every variant side by side
  plain_loop.py    the plain single-process loop (forward + SAE step, no Ray, no MLflow)
  processes.py     whole programs as fresh, timed processes
"""
