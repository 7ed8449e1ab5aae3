"""The Ray-free core: nothing here imports Ray or MLflow, so it is tested in milliseconds and
usable from a notebook; `saeforge.jobs` builds the distributed runs on it.

  model.py        the packaged Gemma 3 270M, Hub ids, local folders, tiny models; slicing; precision
  hooks.py        hook points: capture and replace activations at (layer, site)
  corpus.py       built-in / Hub / local corpora, the held-out split, packing into contexts
  batches.py      what a batch is (whole contexts + mask), its layout, the step budget
  training.py     the training loop, optimiser, schedule, fresh start, side-by-side SAEs
  metrics.py      metrics every variant shares
  evaluation.py   the core evaluation with the model in the loop (SAELens's conventions)
  sae_files.py    the SAE artifact (SAELens layout) and atomic folder replacement
  reporting.py    tables, CSV, the L0 vs CE-loss-recovered plot, the Pareto front
  allocator.py    glibc's malloc told to keep freed memory (producer processes)
  eval_suites/    one module per evaluation suite, their registry and runner
  study/          a study's claims and verdicts, the L0 search's numbers, its report
  browser/        the feature browser's statistics and static site
"""
