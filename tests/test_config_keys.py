"""Every ``_target_`` node under ``conf/`` lists exactly its target's constructor parameters.

For our own classes every parameter is in the yaml, so each option can be overridden from the command line
(``cache.strict=true``) and is documented where users look; a key the constructor does not take would fail at
instantiation. Third-party targets (the Trainer, torch optimizers) list the arguments users set, each of which
must exist.
"""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_object
from omegaconf import DictConfig, OmegaConf

CONF = Path(__file__).resolve().parents[1] / "conf"
HYDRA_KEYS = {"_target_", "_partial_", "_convert_", "_recursive_", "_args_", "defaults"}
# conf/hydra/* are Hydra's own option groups (`# @package hydra.launcher`): they only compose inside the app.
YAMLS = sorted(
    p.relative_to(CONF).with_suffix("").as_posix()
    for p in CONF.rglob("*.yaml")
    if p.parent != CONF and p.relative_to(CONF).parts[0] != "hydra"
)


def _target_nodes(node, path=""):
    if isinstance(node, DictConfig):
        if "_target_" in node:
            yield path or "<root>", node
        for key in node:
            yield from _target_nodes(node._get_node(key), f"{path}.{key}" if path else str(key))


def _parameters(target: str) -> tuple[set[str], bool]:
    """The constructor's named parameters, and whether it also takes arbitrary keywords."""
    obj = get_object(target)
    signature = inspect.signature(obj)
    names = {n for n, p in signature.parameters.items() if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
    return names - {"self"}, any(p.kind is p.VAR_KEYWORD for p in signature.parameters.values())


@pytest.mark.parametrize("name", YAMLS)
def test_target_nodes_list_the_constructor_parameters(name):
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose(config_name=name)
    nodes = list(_target_nodes(cfg))
    if not nodes:
        pytest.skip(f"{name}.yaml has no _target_ node (e.g. an empty 'none' option)")
    for path, node in nodes:
        keys = set(OmegaConf.to_container(node, resolve=False)) - HYDRA_KEYS
        params, takes_kwargs = _parameters(node._target_)
        unknown = keys - params
        assert not unknown or takes_kwargs, (
            f"{name}.yaml {path}: {sorted(unknown)} are not parameters of {node._target_}"
        )
        if node._target_.startswith("lightning_freeze."):
            missing = params - keys
            assert not missing, (
                f"{name}.yaml {path}: {node._target_} parameters missing from the yaml: {sorted(missing)}"
            )
