"""The EViT model, its configuration and checkpoint loading."""

from evit_deploy.model.checkpoint import build_model, read_state_dict
from evit_deploy.model.config import ARCHS, ALIASES, EvitConfig, plan_tokens, resolve_arch
from evit_deploy.model.vit import EViT, init_random_weights

__all__ = [
    "ARCHS",
    "ALIASES",
    "EViT",
    "EvitConfig",
    "build_model",
    "init_random_weights",
    "plan_tokens",
    "read_state_dict",
    "resolve_arch",
]
