"""The files the FID protocol downloads, each with the SHA-256 it must have and where that
hash comes from; downloads are written under a temporary name, hashed, checked and only then
renamed into place (a mismatch leaves nothing behind).

Two of the reference files have no published checksum (neither clean-fid nor NVlabs/edm
publish one). They are pinned on first download: the SHA-256 of the first copy is written
beside it (``<file>.sha256``), every later use checks against it, and ``metrics.json`` says
that the pin is this machine's, not a published one ("first-download"). Compare that hash
with a colleague's copy before trusting a number to the third decimal.
"""

from __future__ import annotations

import hashlib
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Pinned:
    """A downloadable file of the FID protocol."""

    url: str
    sha256: str | None  # None: no published checksum; pinned on first download
    source: str  # where the hash (or its absence) comes from


#: torch-fidelity's port of the TF Inception graph (the weights TTUR, EDM's fid.py, clean-fid's
#: legacy_tensorflow mode and OpenAI's evaluator share). The file name's ``6726825d`` is
#: torch.hub's hash prefix (the first 8 hex digits of the SHA-256); the full digest is the one
#: a third-party repository records for this file (found through the search index; it agrees
#: with the prefix). Not re-computed here: no copy of the file can be downloaded on this machine.
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"

PINNED: dict[str, Pinned] = {
    INCEPTION_FILE: Pinned(
        url="https://github.com/toshas/torch-fidelity/releases/download/v0.2.0/" + INCEPTION_FILE,
        sha256="6726825d0af5f729cebd5821db510b11b1cfad8faad88a03f1befd49fb9129b2",
        source=(
            "torch.hub prefix 6726825d in torch-fidelity's file name; full digest as recorded by a "
            "third-party repository for the same file"
        ),
    ),
    # The CM paper's reference (openai/consistency_models_cifar10 jcm/metrics.py: clean-fid,
    # mode legacy_tensorflow, CIFAR-10 train split, 32 px): mu/sigma of 50,000 training images.
    "cifar10_legacy_tensorflow_train_32.npz": Pinned(
        url="https://www.cs.cmu.edu/~clean-fid/stats/cifar10_legacy_tensorflow_train_32.npz",
        sha256=None,
        source="clean-fid publishes no checksum: pinned on first download",
    ),
    # NVlabs/edm fid.py's CIFAR-10 reference (training set, its TF-Inception pickle).
    "cifar10-32x32.npz": Pinned(
        url="https://nvlabs-fi-cdn.nvidia.com/edm/fid-refs/cifar10-32x32.npz",
        sha256=None,
        source="NVlabs/edm publishes no checksum: pinned on first download",
    ),
}


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def check_file(path: Path, key: str, strict: bool = True) -> dict[str, Any]:
    """The protocol record of a file (``file``, ``sha256``, ``pin``): ``pin`` is "code" (a
    pinned file by name, and its hash matches the code's), "first-download" (matches the hash
    recorded beside it when it was downloaded here), "none" (no pin: recorded only) or, with
    ``strict=False``, "mismatch". With ``strict`` a mismatch raises ValueError naming ``key``."""
    digest = sha256_file(path)
    pin = PINNED.get(path.name)
    side = path.with_name(path.name + ".sha256")
    want, status = None, "none"
    if pin is not None and pin.sha256:
        want, status = pin.sha256, "code"
    elif side.is_file():
        want, status = side.read_text().split()[0], "first-download"
    if want is not None and digest != want:
        if not strict:
            return {"file": str(path), "sha256": digest, "pin": "mismatch"}
        raise ValueError(
            f"{key}={path}: SHA-256 {digest[:16]}... differs from the pinned {want[:16]}... "
            f"({pin.source if status == 'code' and pin else 'recorded at its first download in ' + side.name}); "
            "delete the file to download it again, or check where it came from"
        )
    return {"file": str(path), "sha256": digest, "pin": status}


def download(name: str, folder: Path, key: str) -> Path:
    """Download the pinned file ``name`` into ``folder`` (hash checked before it is renamed
    into place) and return its path; an existing copy is returned as it is (check it with
    :func:`check_file`)."""
    import urllib.request

    pin = PINNED[name]
    dest = folder / name
    if dest.is_file():
        return dest
    from cmexp.utils.network import online

    if os.environ.get("CMEXP_OFFLINE") == "1" or not online(pin.url):
        raise FileNotFoundError(
            f"{key}={name} needs {pin.url}, which cannot be reached here (no network): download it "
            f"elsewhere and copy it into {folder}/ or give its path"
        )
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f".{name}.{os.getpid()}.part"
    try:
        urllib.request.urlretrieve(pin.url, tmp)  # noqa: S310 - a fixed https URL
        digest = sha256_file(tmp)
        if pin.sha256 and digest != pin.sha256:
            raise ValueError(
                f"{key}={name}: the download from {pin.url} has SHA-256 {digest[:16]}..., not the "
                f"pinned {pin.sha256[:16]}... ({pin.source}); nothing was kept"
            )
        if not pin.sha256:
            (folder / (name + ".sha256")).write_text(f"{digest}  {name}\n")
            log.warning(
                "%s has no published checksum; pinned on first download as %s (%s)",
                name,
                digest,
                folder / (name + ".sha256"),
            )
        tmp.replace(dest)
    finally:
        if tmp.exists():
            tmp.unlink()
    return dest


__all__ = ["INCEPTION_FILE", "PINNED", "Pinned", "check_file", "download", "sha256_file"]
