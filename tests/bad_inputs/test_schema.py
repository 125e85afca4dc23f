"""The value schema (``cmexp.utils.checks.SCHEMAS``) covers every number and switch of every
entry point's composed configs, and every value a rule rejects is reported naming its key:
type errors of every numeric key and out-of-range values of every documented key, checked on
the real configs without torch."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from itertools import zip_longest
from typing import Any

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from cmexp.utils.checks import (
    NOT_SETTINGS,
    SCHEMAS,
    ConfigError,
    check_config,
    method_of,
    train_schema,
)
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
        groups = [
            *("dataset", "net", "model", "metric", "schedule", "trainer", "quality", "logger"),
            *("solver", "vp_schedule", "tangent", "latent"),
        ]
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


#: Keys the schema lacks (none now: vp_schedule.alpha_bars.beta_start/beta_end got their rules).
#: The test fails once a listed key gets a rule, so this list cannot go stale.
KNOWN_GAPS: dict[str, set[str]] = {}


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
    gaps = KNOWN_GAPS.get(entry, set())
    assert gaps <= missing, (
        f"known gaps that now have a rule (drop them): {sorted(gaps - missing)}"
    )
    assert not missing - gaps, (
        f"cmexp.{entry}: keys without a rule in cmexp.utils.checks.SCHEMAS: "
        f"{sorted(missing - gaps)}"
    )


def _parent(cfg: DictConfig, key: str) -> tuple[Any, str]:
    parent_key, _, leaf = key.rpartition(".")
    parent = (
        OmegaConf.select(cfg, parent_key, throw_on_resolution_failure=False) if parent_key else cfg
    )
    return parent, leaf


def _settable(cfg: DictConfig, key: str) -> bool:
    """``key`` is in ``cfg`` with a value of its own (not ``???``, not an interpolation)."""
    parent, leaf = _parent(cfg, key)
    return (
        isinstance(parent, DictConfig)
        and leaf in parent.keys()  # noqa: SIM118 - keys() lists ??? too
        and not OmegaConf.is_missing(parent, leaf)
        and not OmegaConf.is_interpolation(parent, leaf)
    )


def _present(cfg: DictConfig, key: str) -> bool:
    """``key`` is in ``cfg``, maybe as ``???`` or an interpolation (the command line sets it)."""
    parent, leaf = _parent(cfg, key)
    return isinstance(parent, DictConfig) and leaf in parent.keys()  # noqa: SIM118


#: Schema keys that no composed config holds: a user adds them with ``+key=value``. Each is still
#: tried (added where its parent is). A key in no composed config and not listed here fails
#: ``test_every_rejected_value_names_its_key`` (it used to be skipped without a word).
ADDED_WITH_PLUS = {
    "train": {
        "model.loss.stage": "ECTLoss(stage=...): the stage to start at; conf/model/ect.yaml omits it",
        "callbacks.sample_quality.optional": "SampleQualityCallback(optional=...); no quality "
        "config sets it",
    },
    "edit": {
        # shared with cmexp.sample through _INFERENCE, but conf/edit.yaml has neither key and
        # cmexp/edit.py reads neither: rules for keys cmexp.edit does not have (issue 35 report)
        "batch_size": "not in conf/edit.yaml, not read by cmexp.edit",
        "num_scales": "not in conf/edit.yaml, not read by cmexp.edit",
    },
}


def _holder(configs: list[DictConfig], key: str, entry: str) -> DictConfig | None:
    """A copy of the first config that holds ``key`` with its own value, else one that holds it as
    ``???`` or an interpolation, else (keys of ``ADDED_WITH_PLUS`` only) one holding its parent."""
    for test in (
        _settable,
        _present,
        lambda c, k: (
            k in ADDED_WITH_PLUS.get(entry, {}) and isinstance(_parent(c, k)[0], DictConfig)
        ),
    ):
        for cfg in configs:
            if test(cfg, key) and _owns(cfg, key, entry):
                return copy.deepcopy(cfg)
    return None


def _owns(cfg: DictConfig, key: str, entry: str) -> bool:
    """A method's own key (not a generic rule) is tried on a config of that method, whose
    rules check it (``cmexp/methods/<name>/rules.py``)."""
    if entry != "train" or key in SCHEMAS["train"]:
        return True
    method = method_of(cfg)
    return method is not None and key in method.schema


@pytest.mark.parametrize("entry", list(SCHEMAS))
def test_every_rejected_value_names_its_key(entry: str, configs) -> None:
    """Each key of the schema, set to each value its rule rejects (a string for a number, a
    number out of range, a choice that does not exist, ...), stops with one message naming it.
    A key that no composed config can take is reported, not skipped."""
    wrong, unheld, checked = [], [], 0
    for key, rule in _schema(entry).items():
        cfg = _holder(configs[entry], key, entry)
        if cfg is None:
            unheld.append(key)
            continue
        for bad in rule.bad:
            trial = copy.deepcopy(cfg)
            with open_dict(trial):
                OmegaConf.update(trial, key, bad, merge=False, force_add=True)
            try:
                check_config(entry, trial)
                wrong.append(f"{key}={bad!r}: accepted")
            except ConfigError as err:
                if not str(err).startswith(f"{key} must be"):
                    wrong.append(f"{key}={bad!r}: {err}")
            checked += 1
    assert not unheld, (
        f"cmexp.{entry}: schema keys in no composed config (list them in ADDED_WITH_PLUS with a "
        f"reason, or drop the rule): {unheld}"
    )
    assert not wrong, "\n".join(wrong)
    assert checked >= 10


def test_keys_added_with_plus_are_still_in_no_composed_config(configs) -> None:
    stale = [
        f"{entry}: {key}"
        for entry, keys in ADDED_WITH_PLUS.items()
        for key in keys
        if any(_present(c, key) for c in configs[entry])
    ]
    assert not stale, f"now composed, drop them from ADDED_WITH_PLUS: {stale}"


#: Hand-written (key, bad value, good value) triples for the important keys, each from what the
#: value means, not from the rule's own bounds (a wrong bound in cmexp.utils.checks fails here).
#: The base command line of each group holds the key and passes the checks.
INDEPENDENT = {
    ("train", "+debug=tiny"): [
        ("dataset.batch_size", 0, 8),
        ("dataset.random_flip", "maybe", False),
        ("net.dropout", 1.0, 0.3),  # a probability of dropping: [0, 1)
        ("net.dropout", -0.1, 0.0),
        ("model.ema_decay", 1.0, 0.9999),  # 1 would never move the average
        ("model.ema_decay", -0.5, 0.0),
        ("model.optimizer.lr", 0.0, 4e-4),
        ("model.precond.sigma_min", 0.0, 0.002),  # sigma_min > 0 (c_out(eps) = 0 needs eps > 0)
        ("model.precond.sigma_max", 0.001, 80.0),  # below sigma_min = 0.002
        ("model.rho", 0.0, 7.0),
        ("model.precond.sigma_data", 0.0, 0.5),
        ("model.taus", [0.0], [0.821]),  # a re-noising sigma > 0
        ("schedule.s0", 0, 10),  # N(0) = s0 + 1 >= 2
        ("schedule.s1", 1, 150),  # s1 >= s0 = 2
        ("schedule.mu0", 1.0, 0.95),  # a target-EMA rate in [0, 1)
        ("trainer.max_steps", 0, 4),
        ("metric.c", -0.03, 0.03),  # pseudo-Huber c >= 0
    ],
    ("train", "+debug=tiny", "schedule=fixed"): [
        ("schedule.num_scales", 1, 18),  # a grid needs two points
        ("schedule.mu", 1.0, 0.0),
    ],
    ("train", "+debug=tiny", "model=ect", "model.teacher_path=zoo:fmnist_edm"): [
        ("model.loss.q", 1.0, 2.0),  # the gap t - r shrinks by q > 1 per stage
        ("model.loss.P_std", 0.0, 2.0),
        ("model.loss.k", -1.0, 8.0),  # n(t) = 1 + k sigmoid(-b t) >= 1
    ],
    ("train", "+debug=tiny", "model=edm"): [
        ("model.label_dropout", 1.0, 0.1),  # 1 would never show a label
    ],
    ("sample", "ckpt=zoo:fmnist_ct"): [
        ("num_samples", 0, 4),
        ("batch_size", 0, 2),
        ("steps", 0, 2),
        ("seed", -1, 0),
    ],
    ("eval", "ckpt=zoo:fmnist_ct"): [
        ("num_samples", 1, 2),  # a covariance needs two samples
        ("num_real", 1, 100),
        ("steps", [0], [1, 2]),
    ],
    ("tau_search", "ckpt=zoo:fmnist_ct"): [
        ("steps", 1, 2),  # one step has no tau to search for
    ],
}


@pytest.mark.parametrize(("command", "rows"), list(INDEPENDENT.items()))
def test_hand_written_bad_values_are_rejected_and_good_ones_pass(command, rows) -> None:
    entry, *overrides = command
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        base = compose(entry, overrides=overrides)
    check_config(entry, base)  # the base passes, so a rejection below is the key's
    wrong = []
    for key, bad, good in rows:
        assert _settable(base, key), f"{command}: no {key}"
        for value, ok in ((bad, False), (good, True)):
            trial = copy.deepcopy(base)
            with open_dict(trial):
                OmegaConf.update(trial, key, value, merge=False)
            try:
                check_config(entry, trial)
                if not ok:
                    wrong.append(f"{key}={value!r}: accepted")
            except ConfigError as err:
                if ok:
                    wrong.append(f"{key}={value!r}: rejected: {err}")
                elif key not in str(err):
                    wrong.append(f"{key}={value!r}: the message does not name the key: {err}")
    assert not wrong, "\n".join(wrong)
