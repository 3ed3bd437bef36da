"""Lambda handlers of the topx pipeline (see handlers.py)."""
