"""``python -m lightning_freeze``: the same Hydra app as the ``lightning-freeze`` command."""

from lightning_freeze.app.main import main

if __name__ == "__main__":
    main()
