"""Hugging Face Hub names: ``load_model("hf-hub:timm/fastvit_t8.apple_in1k")``.

A name ``hf-hub:OWNER/REPO`` (optionally ``@REVISION``) resolves to one weights file of that
repository through ``huggingface_hub``: from its local cache when the repository is there
(``HF_HOME`` / ``HF_HUB_CACHE``, and always with ``HF_HUB_OFFLINE=1``), else downloaded. The
file is the first present of ``WEIGHT_FILES`` (timm's ``model.safetensors``, open_clip's
files, then any ``.safetensors`` / ``.pt`` / ``.pth`` / ``.bin`` in the snapshot, e.g. Apple's
``mobileclip_s0.pt``). Everything ``load_model`` reads from a path, it reads from a hub name.
"""

from __future__ import annotations

import os
from typing import List, Optional, Tuple

from fastvit_jax.weights.state_dict import ConversionError

HUB_PREFIX = "hf-hub:"
WEIGHT_FILES = ("model.safetensors", "open_clip_model.safetensors", "open_clip_pytorch_model.bin",
                "pytorch_model.bin")
WEIGHT_SUFFIXES = (".safetensors", ".pt", ".pth", ".pth.tar", ".bin")
PIN = "huggingface_hub==2.4.0"

# create_model(variant, pretrained=True): the published weights of each base variant (timm's names).
DEFAULT_REPOS = {v: f"timm/fastvit_{v}.apple_in1k" for v in ("t8", "t12", "s12", "sa12", "sa24", "sa36", "ma36")}


class HubError(ConversionError):
    """A hub name that cannot be resolved to a local file; the message names the repository and the fix."""


def is_hub_name(path: object) -> bool:
    return isinstance(path, str) and path.startswith(HUB_PREFIX)


def parse_hub_name(name: str) -> Tuple[str, Optional[str]]:
    """'hf-hub:owner/repo@rev' -> ('owner/repo', 'rev'); HubError for a malformed name."""
    repo, _, revision = name[len(HUB_PREFIX):].partition("@")
    if repo.count("/") != 1 or not all(repo.split("/")):
        raise HubError(f"{name!r} is not a hub name of the form hf-hub:OWNER/REPO[@REVISION] "
                       f"(e.g. hf-hub:timm/fastvit_t8.apple_in1k)")
    return repo, revision or None


def _pick(files: List[str]) -> Optional[str]:
    for preferred in WEIGHT_FILES:
        if preferred in files:
            return preferred
    candidates = sorted(f for f in files if f.endswith(WEIGHT_SUFFIXES))
    return candidates[0] if candidates else None


def resolve(name: str) -> str:
    """The local path of the weights file ``name`` points to (cached, or downloaded when online)."""
    repo, revision = parse_hub_name(name)
    try:
        import huggingface_hub as hf
        from huggingface_hub import constants
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:
        raise HubError(f"{name!r} needs huggingface_hub: pip install {PIN} (or the project's [hub] extra)") from None
    try:
        snapshot = hf.snapshot_download(repo, revision=revision, local_files_only=True,
                                        allow_patterns=["*" + s for s in WEIGHT_SUFFIXES])
    except LocalEntryNotFoundError:
        snapshot = None
    if snapshot is not None:
        found = _pick([os.path.relpath(os.path.join(root, f), snapshot)
                       for root, _, files in os.walk(snapshot) for f in files])
        if found is not None:
            return os.path.join(snapshot, found)
    cache = constants.HF_HUB_CACHE
    if constants.HF_HUB_OFFLINE:
        raise HubError(f"{repo} is not in the Hugging Face cache ({cache}) and HF_HUB_OFFLINE is set: download it "
                       f"where the hub is reachable (hf download {repo}) and copy the cache, or pass a local file")
    for filename in WEIGHT_FILES:
        try:
            return hf.hf_hub_download(repo, filename, revision=revision)
        except EntryNotFoundError:
            continue
        except Exception as e:  # noqa: BLE001 - network, auth, unknown repository: one message
            raise HubError(f"cannot fetch {repo} from the Hugging Face Hub ({type(e).__name__}: "
                           f"{str(e).splitlines()[0][:200] if str(e) else ''}); it is not in the cache ({cache}) "
                           f"either") from None
    raise HubError(f"{repo} has none of the weight files {', '.join(WEIGHT_FILES)}")
