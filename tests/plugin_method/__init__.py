"""A training method defined entirely in the test folder, the proof that a method is one folder
(tests/integration/test_plugin_method.py): EDM with a log-uniform noise distribution,
``ln sigma ~ U[ln sigma_lo, ln sigma_hi]`` instead of EDM's lognormal. Nothing under ``cmexp/``
names it: it registers itself here (torch-free) and its YAML files live in ``conf/`` beside it
(``hydra.searchpath=[file://<this folder>/conf]``)."""

from tests.plugin_method.rules import SCHEMA, rules

from cmexp.registry import Method, register_method

register_method(
    Method(
        kind="loguniform_edm",
        module="tests.plugin_method.module.LogUniformEDMLitModule",
        family="denoiser",
        wrapper="cmexp.diffusion.precond:EDMPrecond",
        sampler="heun",
        schema=SCHEMA,
        rules=rules,
        doc="tests/plugin_method/__init__.py",
    )
)
