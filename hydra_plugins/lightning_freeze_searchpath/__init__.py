"""Hydra plugin for lightning-freeze: the ``lightning-freeze://`` config source (see ``searchpath.py``)."""
