"""The value schema (``cmexp.utils.checks.SCHEMAS``) covers every number and switch of every
entry point's composed configs, and every value a rule rejects is reported naming its key:
type errors of every numeric key and out-of-range values of every documented key, checked on
the real configs without torch."""

from __future__ import annotations

from collections.abc import Iterator
from itertools import zip_longest
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from cmexp.utils.checks import NOT_SETTINGS, SCHEMAS, ConfigError, check_config, train_schema
from cmexp.utils.cli import CONF_DIR


def _schema(entry: str) -> dict:
    """The rules of an entry point; training: the generic ones and every registered method's
    (``cmexp/methods/<name>/rules.py``)."""
    return train_schema() if entry == "train" else SCHEMAS[entry]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def _overrides(entry: str) -> list[list[str]]:
    """Command lines whose configs hold every key the entry point can have: every experiment,
    and every option of every group (zipped, so a few compositions cover them all)."""
    if entry == "train":
        groups = ["dataset", "net", "model", "metric", "schedule", "trainer", "quality", "logger"]
        zipped = zip_longest(*[[f"{g}={o}" for o in _options(g)] for g in groups])
        combos = [[o for o in combo if o] for combo in zipped]
        return [[f"+experiment={e}"] for e in _options("experiment")] + [
            *combos,
            ["+debug=tiny"],
            ["+debug=fdr"],
        ]
    if entry == "edit":
        return [[f"task={t}", "ckpt=x"] for t in _options("task")]
    if entry in ("eval", "tau_search"):
        datasets = _options("dataset") if entry == "eval" else ["fashion_mnist"]
        return [
            [f"features={f}", *([f"dataset={d}"] if entry == "eval" else [])]
            for f in _options("features")
            for d in datasets
        ]
    return [["ckpt=x"]]


@pytest.fixture(scope="module")
def configs() -> dict[str, list[DictConfig]]:
    out = {}
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for entry in SCHEMAS:
            out[entry] = [compose(entry, overrides=o) for o in _overrides(entry)]
    return out


def _leaves(node: DictConfig, prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key in node:
        path = f"{prefix}.{key}" if prefix else str(key)
        if OmegaConf.is_missing(node, key) or OmegaConf.is_interpolation(node, key):
            continue
        value = node[key]
        if isinstance(value, DictConfig):
            yield from _leaves(value, path)
        else:
            yield path, OmegaConf.to_container(value) if isinstance(value, ListConfig) else value


@pytest.mark.parametrize("entry", list(SCHEMAS))
def test_every_number_and_switch_has_a_rule(entry: str, configs) -> None:
    missing = set()
    for cfg in configs[entry]:
        for key, value in _leaves(cfg):
            numeric = isinstance(value, (int, float, bool)) or (
                isinstance(value, list)
                and value
                and all(isinstance(v, (int, float)) for v in value)
            )
            if (
                numeric
                and key.rsplit(".", 1)[-1] not in NOT_SETTINGS
                and key not in _schema(entry)
            ):
                missing.add(key)
    assert not missing, (
        f"cmexp.{entry}: keys without a rule in cmexp.utils.checks.SCHEMAS: {sorted(missing)}"
    )


def _settable(cfg: DictConfig, key: str) -> bool:
    """``key`` is in ``cfg`` with a value of its own (not ``???``, not an interpolation)."""
    parent_key, _, leaf = key.rpartition(".")
    parent = (
        OmegaConf.select(cfg, parent_key, throw_on_resolution_failure=False) if parent_key else cfg
    )
    return (
        isinstance(parent, DictConfig)
        and leaf in parent.keys()  # noqa: SIM118 - keys() lists ??? too
        and not OmegaConf.is_missing(parent, leaf)
        and not OmegaConf.is_interpolation(parent, leaf)
    )


@pytest.mark.parametrize("entry", list(SCHEMAS))
def test_every_rejected_value_names_its_key(entry: str, configs) -> None:
    """Each key of the schema, set to each value its rule rejects (a string for a number, a
    number out of range, a choice that does not exist, ...), stops with one message naming it."""
    wrong, checked = [], 0
    for key, rule in _schema(entry).items():
        holders = [c for c in configs[entry] if _settable(c, key)]
        if not holders:
            continue
        cfg = holders[0]
        original = OmegaConf.select(cfg, key, throw_on_resolution_failure=False)
        for bad in rule.bad:
            with open_dict(cfg):
                OmegaConf.update(cfg, key, bad, merge=False)
            try:
                check_config(entry, cfg)
                wrong.append(f"{key}={bad!r}: accepted")
            except ConfigError as err:
                if not str(err).startswith(f"{key} must be"):
                    wrong.append(f"{key}={bad!r}: {err}")
            finally:
                with open_dict(cfg):
                    OmegaConf.update(cfg, key, original, merge=False)
            checked += 1
    assert not wrong, "\n".join(wrong)
    assert checked >= 10
