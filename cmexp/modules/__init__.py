"""LightningModules, one per training mode: EDM teacher, CD, CT, ECT, progressive distillation, sCT/sCD (and
the feature classifier, and the autoencoder of latent mode)."""

from cmexp.modules.autoencoder import AutoencoderLitModule
from cmexp.modules.base import DiffusionLitModule, NonFiniteLossError
from cmexp.modules.classifier import ClassifierLitModule
from cmexp.modules.consistency import CDLitModule, ConsistencyLitModule, CTLitModule, load_teacher
from cmexp.modules.ect import ECTLitModule
from cmexp.modules.edm import EDMLitModule
from cmexp.modules.pd import PDLitModule
from cmexp.modules.scm import SCDLitModule, SCMLitModule, SCTLitModule

__all__ = [
    "AutoencoderLitModule",
    "CDLitModule",
    "CTLitModule",
    "ClassifierLitModule",
    "ConsistencyLitModule",
    "DiffusionLitModule",
    "ECTLitModule",
    "EDMLitModule",
    "NonFiniteLossError",
    "PDLitModule",
    "SCDLitModule",
    "SCMLitModule",
    "SCTLitModule",
    "load_teacher",
]
