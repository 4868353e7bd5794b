"""MLflow pyfunc wrapper, logged as "models from code": MLflow stores this file, not a pickle of an object.

It makes a Flywheel model usable by anything that speaks MLflow (`mlflow models serve`, batch scoring with
`mlflow.pyfunc.load_model`), while the weights stay in the bundle's safetensors file. predict() has no type
hints on purpose: the model's explicit signature (derived from the feature spec) is the input contract.
"""

from __future__ import annotations

from pathlib import Path

import mlflow.pyfunc
from mlflow.models import set_model

from pipeline.learn.model import ModelBundle


class FlywheelPyfunc(mlflow.pyfunc.PythonModel):
    def load_context(self, context):
        self.bundle = ModelBundle.load(Path(context.artifacts["bundle"]))

    def predict(self, context, model_input, params=None):
        return self.bundle.predict(model_input)


set_model(FlywheelPyfunc())
