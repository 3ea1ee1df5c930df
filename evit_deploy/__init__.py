"""evit-deploy: export, validate, build and serve EViT token-pruned vision transformers."""

from evit_deploy.version import __version__


def __getattr__(name: str):
    # Lazy, so `import evit_deploy` (and the CLI's --help) does not pay for torch/onnxruntime.
    if name in ("Predictor", "Prediction"):
        from evit_deploy.runtime import predictor

        return getattr(predictor, name)
    raise AttributeError(f"module 'evit_deploy' has no attribute {name!r}")


__all__ = ["Prediction", "Predictor", "__version__"]
