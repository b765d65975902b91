"""lightning-freeze's config groups for any Hydra app that asks for them, and for no other app.

An app asks in its primary config::

    hydra:
      searchpath:
        - lightning-freeze://

and then composes our groups next to its own (``defaults: [freeze: layer_freeze, split: kfold]``); groups and
options the app defines itself come first and win on a name clash. ``lightning-freeze://`` is a Hydra config
source registered by this plugin: it serves the ``conf/`` directory of the installed package (the package
owns that location: :mod:`lightning_freeze.app.config_dir`). Nothing is added to the search path of an app
that does not list it, so other apps' primary configs, ``--help`` and overrides are exactly what they would
be without lightning-freeze installed.

``--help`` needs one more step. Hydra lists the groups of ``--help`` from the search path it starts with,
before the primary config's ``hydra.searchpath`` is read (it composes with that path, but lists groups
without it), so an app that asks would not see our groups there. :class:`LightningFreezeHelpSearchPath`
reads the same ``hydra.searchpath`` Hydra reads (the command-line override, else the primary config's) when,
and only when, the process answers an app's ``--help``, and then adds ``lightning-freeze://`` to the path the
help lists. Shell completion already lists them: Hydra completes with the primary config's search path.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

from hydra._internal.core_plugins.file_config_source import FileConfigSource
from hydra.core.config_search_path import ConfigSearchPath
from hydra.plugins.config_source import ConfigSource
from hydra.plugins.search_path_plugin import SearchPathPlugin
from typing_extensions import override

from lightning_freeze.app.config_dir import CONFIG_NAME, SEARCH_PATH, conf_dir

__all__ = ["CONFIG_NAME", "SEARCH_PATH", "LightningFreezeConfigSource", "LightningFreezeHelpSearchPath"]


class LightningFreezeConfigSource(FileConfigSource):
    """The ``lightning-freeze://`` config source: lightning-freeze's ``conf/`` directory, wherever installed.

    Args:
        provider: who added this entry to the search path (Hydra passes it).
        path: the search-path entry, ``lightning-freeze://``.
    """

    def __init__(self, provider: str, path: str) -> None:
        ConfigSource.__init__(self, provider=provider, path=path)  # checks the scheme
        self.path = str(conf_dir())

    @staticmethod
    @override
    def scheme() -> str:
        return "lightning-freeze"


def _help_request() -> tuple[str | None, list[str]] | None:
    """``(primary config name, command-line overrides)`` when this process answers an app's ``--help``.

    Hydra's ``_run_hydra`` holds both, resolved from ``@hydra.main`` and the command line, while it builds the
    search path; outside it (the compose API, a job, ``--hydra-help``) there is no app help to list.
    """
    frame = sys._getframe(1)
    while frame is not None:
        if (
            frame.f_code.co_name == "_run_hydra"
            and frame.f_globals.get("__name__") == "hydra._internal.utils"
        ):
            args = frame.f_locals.get("args")
            if not getattr(args, "help", False):
                return None
            return frame.f_locals.get("config_name"), list(getattr(args, "overrides", None) or [])
        frame = frame.f_back  # type: ignore[assignment]
    return None


def _requested_search_path(
    search_path: ConfigSearchPath, config_name: str | None, overrides: list[str]
) -> Any:
    """The ``hydra.searchpath`` Hydra will use: a command-line override, else the primary config's value."""
    from hydra._internal.config_repository import ConfigRepository
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf import OmegaConf

    for parsed in OverridesParser.create().parse_overrides(overrides=overrides):
        if parsed.get_key_element() == "hydra.searchpath":
            return parsed.value()
    if config_name is None:
        return None
    with_schema = copy.deepcopy(search_path)
    with_schema.append("schema", "structured://")  # primary configs from Hydra's ConfigStore, too
    loaded = ConfigRepository(with_schema).load_config(config_path=config_name)
    return None if loaded is None else OmegaConf.select(loaded.config, "hydra.searchpath")


class LightningFreezeHelpSearchPath(SearchPathPlugin):
    """Lists our groups in the ``--help`` of an app whose ``hydra.searchpath`` asks for them (see above)."""

    @override
    def manipulate_search_path(self, search_path: ConfigSearchPath) -> None:
        request = _help_request()
        if request is None:
            return
        try:
            requested = _requested_search_path(search_path, *request)
        except Exception:  # Hydra reports a broken primary config or override itself, with its own message
            return
        if requested is None or isinstance(requested, str):  # Hydra refuses a non-list searchpath itself
            return
        if SEARCH_PATH in [str(entry) for entry in requested]:
            search_path.append(provider="lightning-freeze", path=SEARCH_PATH)
