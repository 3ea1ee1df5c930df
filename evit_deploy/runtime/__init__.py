"""Runtimes: backends behind one Predictor, and the benchmark."""

from evit_deploy.runtime.backends import load_backend
from evit_deploy.runtime.base import Backend
from evit_deploy.runtime.predictor import Prediction, Predictor

__all__ = ["Backend", "Prediction", "Predictor", "load_backend"]
