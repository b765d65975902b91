"""Where the app's Hydra configs live, found without importing torch or Lightning.

The package owns this location; the ``lightning-freeze://`` config source (``hydra_plugins/``) imports it
from here. Hydra imports every plugin module for every Hydra app on the machine, so this module imports
nothing heavier than :mod:`pathlib`.
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["CONFIG_NAME", "SEARCH_PATH", "conf_dir"]

CONFIG_NAME = "lightning_freeze"  # the app's primary config: a name no other app uses
SEARCH_PATH = "lightning-freeze://"  # what another app lists under hydra.searchpath to use our groups


def conf_dir() -> Path:
    """The directory holding lightning-freeze's Hydra configs.

    In an installed wheel it is ``lightning_freeze/conf`` inside the package; in a source checkout (editable
    install) it is ``conf/`` at the repository root.

    Raises:
        FileNotFoundError: neither location holds the primary config (a broken install).
    """
    package = Path(__file__).resolve().parents[1]
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / f"{CONFIG_NAME}.yaml").is_file():
            return candidate
    raise FileNotFoundError(f"lightning-freeze configs not found next to {package}")
