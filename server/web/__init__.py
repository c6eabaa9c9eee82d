"""The case-lookup page (`xmodal web`): a FastAPI app around a SearchClient; see app.py for its
routes and JSON API."""

from .app import DEFAULT_HOST, DEFAULT_PORT, create_app

__all__ = ["create_app", "DEFAULT_HOST", "DEFAULT_PORT"]
