"""The EViT model, its configuration and checkpoint loading.

The configuration (model.config, model.flops) is plain Python; the model and checkpoint loading
need torch, so they are imported on first use and `info` or `plan` never load torch.
"""

from evit_deploy.model.config import ARCHS, ALIASES, EvitConfig, EvitOverrides, plan_tokens, resolve_arch

_WITH_TORCH = {
    "build_model": "evit_deploy.model.checkpoint",
    "load_model": "evit_deploy.model.checkpoint",
    "read_state_dict": "evit_deploy.model.checkpoint",
    "EViT": "evit_deploy.model.vit",
    "init_random_weights": "evit_deploy.model.vit",
}


def __getattr__(name: str):
    if name in _WITH_TORCH:
        import importlib

        return getattr(importlib.import_module(_WITH_TORCH[name]), name)
    raise AttributeError(f"module 'evit_deploy.model' has no attribute {name!r}")


__all__ = [
    "ARCHS",
    "ALIASES",
    "EViT",
    "EvitConfig",
    "EvitOverrides",
    "build_model",
    "load_model",
    "init_random_weights",
    "plan_tokens",
    "read_state_dict",
    "resolve_arch",
]
