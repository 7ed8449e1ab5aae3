"""The SAE as an MLflow pyfunc model: input raw activations (n, d_in), output latents (n, d_sae).

Kept apart from tracking.py because defining a PythonModel imports all of mlflow.pyfunc.
"""

import warnings

import numpy as np

with warnings.catch_warnings():  # mlflow nags about type hints on predict; numpy arrays need none
    warnings.simplefilter("ignore", UserWarning)
    import mlflow.pyfunc

    class SAEPyfunc(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            from saeforge.core.sae_files import load_sae

            self.sae, self.cfg = load_sae(context.artifacts["sae"])

        def predict(self, context, model_input, params=None):
            import torch

            x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
            with torch.no_grad():
                return self.sae.encode_raw(x).numpy()
