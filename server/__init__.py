"""xmodal server: gRPC services over a data directory's live snapshot.

Split as protocol (proto/), plain logic (engine.py), transport (service.py), with the
error mapping in one place (errors.py). Submodules are imported where needed.
"""
