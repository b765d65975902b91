"""Hydra search-path plugin that makes lightning-freeze's config groups available to any Hydra app.

With lightning-freeze installed, a user's own app can write ``defaults: [freeze: layer_freeze]``
(or ``trainer: cpu``, ``split: holdout``...) and compose our groups next to its own; groups the
app defines itself come first in the search path and win on a name clash.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.search_path_plugin import SearchPathPlugin

__all__ = ["LightningFreezeSearchPathPlugin", "conf_dir"]


def conf_dir() -> Path:
    """The directory holding lightning-freeze's Hydra configs.

    In an installed wheel it is ``lightning_freeze/conf`` inside the package; in a source checkout
    (editable install) it is ``conf/`` at the repository root. Found without importing
    ``lightning_freeze`` (which would import torch into every Hydra app).
    """
    spec = find_spec("lightning_freeze")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("lightning_freeze is not importable")
    package = Path(next(iter(spec.submodule_search_locations)))
    for candidate in (package / "conf", package.parent / "conf"):
        if (candidate / "config.yaml").is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"lightning-freeze configs not found next to {package}")


class LightningFreezeSearchPathPlugin(SearchPathPlugin):
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        try:
            path = conf_dir()
        except (ModuleNotFoundError, FileNotFoundError):  # a broken install must not break other apps
            return
        url = f"file://{path}"
        if any(element.path == url for element in search_path.get_path()):
            return  # lightning-freeze's own app: already its primary config dir
        search_path.append(provider="lightning-freeze", path=url)
