"""lightning-freeze's config groups for any Hydra app that asks for them, and for no other app.

An app asks in its primary config::

    hydra:
      searchpath:
        - lightning-freeze://

and then composes our groups next to its own (``defaults: [freeze: layer_freeze, split: kfold]``); groups and
options the app defines itself come first and win on a name clash. ``lightning-freeze://`` is a Hydra config
source registered by this plugin: it serves the ``conf/`` directory of the installed package. Nothing is added
to the search path of an app that does not list it, so other apps' primary configs, ``--help`` and overrides
are exactly what they would be without lightning-freeze installed.
"""

from __future__ import annotations

from importlib.util import find_spec
from pathlib import Path

from hydra._internal.core_plugins.file_config_source import FileConfigSource
from hydra.plugins.config_source import ConfigSource

__all__ = ["CONFIG_NAME", "SEARCH_PATH", "LightningFreezeConfigSource", "conf_dir"]

CONFIG_NAME = "lightning_freeze"  # the app's primary config: a name no other app uses
SEARCH_PATH = "lightning-freeze://"


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
        if (candidate / f"{CONFIG_NAME}.yaml").is_file():
            return candidate.resolve()
    raise FileNotFoundError(f"lightning-freeze configs not found next to {package}")


class LightningFreezeConfigSource(FileConfigSource):
    """The ``lightning-freeze://`` config source: lightning-freeze's ``conf/`` directory, wherever installed."""

    def __init__(self, provider: str, path: str) -> None:
        ConfigSource.__init__(self, provider=provider, path=path)  # checks the scheme
        self.path = str(conf_dir())

    @staticmethod
    def scheme() -> str:
        return "lightning-freeze"
