"""The SAE as an MLflow pyfunc model: input raw activations (n, d_in), output latents (n, d_sae).

Logged as models-from-code: `tracking.log_and_register` hands MLflow this file's path, MLflow
copies the file into the model and runs it when the model is loaded (`set_model` below names
the model), so nothing is pickled and a registered SAE does not depend on the class layout of
the saeforge that logged it. The SAE itself is the model's one artifact (its SAELens folder).
Kept apart from registry.py because defining a PythonModel imports all of mlflow.pyfunc.
"""

import warnings

import numpy as np

with warnings.catch_warnings():  # mlflow nags about type hints on predict; numpy arrays need none
    warnings.simplefilter("ignore", UserWarning)
    import mlflow.pyfunc
    from mlflow.models import set_model

    class SAEPyfunc(mlflow.pyfunc.PythonModel):
        def load_context(self, context):
            from saeforge.core.sae_files import load_sae

            self.sae, self.cfg = load_sae(context.artifacts["sae"])

        def predict(self, context, model_input, params=None):
            import torch

            x = torch.as_tensor(np.asarray(model_input, dtype=np.float32))
            with torch.no_grad():
                return self.sae.encode_raw(x).numpy()

    set_model(SAEPyfunc())
