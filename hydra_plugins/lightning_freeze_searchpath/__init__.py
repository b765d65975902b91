"""Hydra search-path plugin for lightning-freeze (see ``searchpath.py``)."""
