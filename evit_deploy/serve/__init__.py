"""Serving: `evit-deploy serve` (Triton Inference Server through PyTriton, plus a REST front for
images) and `evit-deploy triton-repo` (a model repository for a standalone Triton)."""

from evit_deploy.serve.server import BatchRunner, EvitServer, ServeOptions

__all__ = ["BatchRunner", "EvitServer", "ServeOptions"]
