"""The KL autoencoder of latent mode (``+experiment=fmnist_autoencoder``;
docs/conditional_latent.md). Not a sampled model."""

from cmexp.methods.autoencoder.rules import SCHEMA
from cmexp.registry import Method, register_method

register_method(
    Method(
        kind="autoencoder",
        module="cmexp.methods.autoencoder.module.AutoencoderLitModule",
        schema=SCHEMA,
        doc="docs/conditional_latent.md",
    )
)
