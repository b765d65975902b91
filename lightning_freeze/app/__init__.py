"""The Hydra application: ``lightning-freeze`` / ``python -m lightning_freeze`` (see ``app.main``)."""
