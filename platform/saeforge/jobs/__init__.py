"""The jobs: what runs on Ray and talks to MLflow (the activation stream, the Train worker, the
train / tune / eval / compare / bench drivers, tracking and the registry, connecting to Ray).
A driver validates its arguments once into a typed plan and ships it whole to workers and trials."""
