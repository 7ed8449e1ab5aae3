"""saeforge: train sparse autoencoders on Gemma activations with Ray, track them with MLflow."""

__version__ = "0.1.0"
