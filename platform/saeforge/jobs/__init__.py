"""The jobs: what runs on Ray and talks to MLflow. A driver validates its arguments once into a
typed plan and ships it whole to workers and trials.

  arguments.py   the one argument model: every verb's fields, with their help
  plan.py        the typed plans (RunPlan, StreamSpec, Resources, TrackingTarget, StudyPlan, ...)
  validate.py    flags -> plan in one pass (plan_train, plan_tune, plan_study)
  checks.py      every input check, each in one place
  sweep.py       what tune and study share: set-up, trial resources, eval model, parent run
  eval.py        the `saeforge eval` driver
  browse.py      the `saeforge browse` driver
  compare.py     the `saeforge compare` driver
  runtime/       Ray: connecting, resources, storage, failures, progress lines, fault hook
  data/          the corpus read task, the producer actors' activation stream, the activation cache
  tracking/      MLflow: the store, runs, the registry and champion rule, the registered pyfunc
  train/         `saeforge train`: driver, worker loop, TorchTrainer factory, checkpoints
  tune/          `saeforge tune`: driver, tune spaces, one trial
  study/         `saeforge study`: driver, one SAE of a study
"""
