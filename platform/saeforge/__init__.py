"""saeforge trains sparse autoencoders (SAEs) on the activations of Gemma models with Ray, and
keeps them in MLflow: Ray actors host a slice of the model and stream activations into the
object store, Ray Train workers train the SAE, each SAE is evaluated on held-out text, logged,
registered and given the alias `champion` when it beats the current one. Ray Tune searches a
variant's hyperparameters on activations made once; `study` re-runs a seed paper's comparison.

The package (its first paragraph above is `saeforge --help`'s):

  cli/        the verbs: flags and printing
  bench/      `saeforge bench`'s benchmarks
  jobs/       the drivers, on Ray and MLflow
  core/       no Ray, no MLflow: model, corpus, training loop, evaluation, SAE files
  errors.py   UserError (one line, exit 2) and RunFailed (one line, exit 1)
The SAE variants are the top-level `variants` package.
"""

__version__ = "0.1.0"
