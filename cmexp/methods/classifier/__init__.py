"""The Fashion-MNIST feature classifier of the suite's fd_fmnist metric
(``+experiment=fmnist_classifier``; docs/zoo.md). Not a sampled model."""

from cmexp.methods.classifier.rules import SCHEMA, rules
from cmexp.registry import Method, register_method

register_method(
    Method(
        kind="classifier",
        module="cmexp.methods.classifier.module.ClassifierLitModule",
        schema=SCHEMA,
        rules=rules,
        doc="docs/zoo.md",
    )
)
