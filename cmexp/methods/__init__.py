"""The training methods, one package each (a method is one folder): its loss, its
LightningModule, its config rules and what inference needs for its checkpoints. Each package's
``__init__`` registers it in :mod:`cmexp.registry` (torch-free); nothing outside a method's
folder names its classes. Adding a method: docs/architecture.md, "Adding a method"."""

#: The built-in method packages in the order their kinds are listed (messages, ``kinds()``);
#: any other package in this folder is discovered after them.
ORDER = ("edm", "pd", "consistency", "ect", "scm", "classifier", "autoencoder")
