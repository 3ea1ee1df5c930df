"""evit-deploy: export, validate, build and serve EViT token-pruned vision transformers."""

__version__ = "0.1.0"
