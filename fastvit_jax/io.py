"""One on-disk format for Flax variables: safetensors (no pickle), flat '/'-joined keys.

``save_variables(path, variables)`` writes ``{'params': ..., 'batch_stats': ...}`` as
tensors named e.g. ``params/stages_0/blocks_1/mlp/fc1/kernel``; string metadata (variant,
form, ...) rides along in the safetensors header. Every output of the project goes through
``write_atomically``: a temporary file renamed at the end, never an input overwritten.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load_file, save

from fastvit_variants import pretrained_cfg

FORMAT = "fastvit_jax.variables/1"


def flatten_variables(variables: Mapping[str, Any]) -> Dict[str, np.ndarray]:
    """Nested dict of arrays -> {'a/b/c': np.ndarray}."""
    flat: Dict[str, np.ndarray] = {}

    def walk(prefix: str, node: Any) -> None:
        if isinstance(node, Mapping):
            for k, v in node.items():
                if "/" in str(k):
                    raise ValueError(f"variable name {k!r} under {prefix!r} contains '/'")
                walk(f"{prefix}/{k}" if prefix else str(k), v)
        else:
            arr = np.asarray(node)
            flat[prefix] = np.ascontiguousarray(arr) if arr.ndim else arr

    walk("", variables)
    return flat


def unflatten_variables(flat: Mapping[str, Any]) -> Dict[str, Any]:
    """{'a/b/c': array} -> nested dict."""
    out: Dict[str, Any] = {}
    for key, value in flat.items():
        node = out
        *parents, leaf = key.split("/")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value
    return out


def model_metadata(model: Any) -> Dict[str, Any]:
    """What a FastViT module says about its variables: variant, form, classes, data config."""
    cfg = model.pretrained_cfg or pretrained_cfg(model.cfg.name, num_classes=model.num_classes)
    return {
        "variant": model.cfg.name,
        "form": "fused" if model.inference_mode else "train",
        "num_classes": int(model.num_classes),
        "image_size": int(cfg.input_size[-1]),
        "pretrained_cfg": cfg.to_dict(),
    }


class WriteError(ValueError):
    """An output that cannot be written (or must not be); the message says which and why."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _temp_name(path: str, pid: int) -> str:
    directory, name = os.path.split(path)
    return os.path.join(directory, f".{name}.tmp-{pid}")


def remove_stale_temp_files(path: str) -> List[str]:
    """Delete ``.<name>.tmp-<pid>`` files beside ``path`` left by killed writers (dead pids)."""
    directory, name = os.path.split(os.path.abspath(path))
    prefix, removed = f".{name}.tmp-", []
    for entry in os.listdir(directory) if os.path.isdir(directory) else ():
        pid = entry[len(prefix):]
        if entry.startswith(prefix) and pid.isdigit() and not _pid_alive(int(pid)):
            os.remove(os.path.join(directory, entry))
            removed.append(entry)
    return removed


def same_file(a: str, b: str) -> bool:
    """True when ``a`` and ``b`` name one file (same path, symlink or hard link)."""
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


# Libraries with native writers report OSErrors as text: tensorstore "[os_error_code='28']",
# safetensors "(os error 28)".
_NATIVE_ERRNO = re.compile(r"os_error_code='(\d+)'|\(os error (\d+)\)")
_FILE_SYSTEM_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS)


def file_system_error(error: BaseException) -> Optional[OSError]:
    """The file-system ``OSError`` (no space, quota, permission, read-only) behind ``error``, or None.

    Looks through the cause chain and the messages of native writers (tensorstore, safetensors,
    TensorFlow), which carry the errno or its text rather than raising OSError.
    """
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _FILE_SYSTEM_ERRNOS:
            return error
        text = str(error)
        match = _NATIVE_ERRNO.search(text)
        if match and int(match.group(1) or match.group(2)) in _FILE_SYSTEM_ERRNOS:
            code = int(match.group(1) or match.group(2))
            return OSError(code, os.strerror(code))
        for code in _FILE_SYSTEM_ERRNOS:  # e.g. TensorFlow's ResourceExhaustedError("... No space left on device")
            if os.strerror(code) in text:
                return OSError(code, os.strerror(code))
        error = error.__cause__ or error.__context__
    return None


def describe_os_error(path: str, error: OSError, size_hint: Optional[int] = None) -> str:
    """One line naming ``path`` and the cause of ``error`` (no space with the sizes, permission, read-only)."""
    directory = path if os.path.isdir(path) else os.path.dirname(path)
    if error.errno == errno.ENOSPC:
        free = shutil.disk_usage(directory).free
        need = f"needs about {size_hint / 2**20:.1f} MiB, " if size_hint else ""
        return f"cannot write {path!r}: no space left on the device ({need}{free / 2**20:.1f} MiB free in {directory!r})"
    if error.errno in (errno.EACCES, errno.EPERM):
        return f"cannot write {path!r}: permission denied in {directory!r}"
    if error.errno == errno.EROFS:
        return f"cannot write {path!r}: {directory!r} is on a read-only file system"
    return f"cannot write {path!r}: {error.strerror or error}"


def write_safetensors(arrays: Mapping[str, np.ndarray], path: str, metadata: Optional[Mapping[str, str]] = None
                      ) -> None:
    """Writes ``arrays`` as a .safetensors file at ``path`` itself.

    (safetensors' ``save_file`` goes through a temporary file of its own beside ``path``, which a
    killed writer leaves behind under a name ``write_atomically`` cannot know; serializing in
    memory keeps every byte in ``write_atomically``'s own temporary file.)
    """
    data = save(dict(arrays), metadata=dict(metadata) if metadata else None)
    with open(path, "wb") as f:
        f.write(data)


def write_text_atomically(path: str | os.PathLike, text: str) -> str:
    """``write_atomically`` for a small text file (a config, a JSON record, a metrics log)."""

    def write(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write(text)

    return write_atomically(path, write)


def write_atomically(path: str | os.PathLike, write: Callable[[str], Any], *, overwrite: bool = True,
                     inputs: Sequence[str | os.PathLike] = (), size_hint: Optional[int] = None) -> str:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``.

    Nothing is ever half-written: the temporary ``.<name>.tmp-<pid>`` is removed on failure, and
    ones left by killed writers are removed first. ``path`` must not be one of ``inputs`` (same
    path, symlink or hard link), whatever ``overwrite`` says. The file gets the permissions of a
    newly created file (0666 minus the umask). File-system failures raise ``WriteError`` naming
    the path and the cause (no space, permission, read-only file system).
    """
    path = os.path.abspath(os.fspath(path))
    for source in inputs:
        if same_file(path, os.fspath(source)):
            raise WriteError(f"output {path!r} is the input file {os.fspath(source)!r}; refusing to overwrite "
                             "an input: choose another output name")
    if os.path.exists(path) and not overwrite:
        raise WriteError(f"output {path!r} exists; pass --overwrite to replace it")
    if os.path.isdir(path):
        raise WriteError(f"output {path!r} is a directory")
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise WriteError(f"output directory {directory!r} does not exist")
    tmp = _temp_name(path, os.getpid())
    try:
        remove_stale_temp_files(path)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except Exception as e:  # noqa: BLE001 - native writers raise their own types for OS errors
        cause = e if isinstance(e, OSError) else file_system_error(e)
        if cause is None:
            raise
        raise WriteError(describe_os_error(path, cause, size_hint)) from e
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    return path


def read_json_file(path: str | os.PathLike, fix: str) -> Any:
    """``json.load`` of ``path``; a torn or hand-damaged file is a ValueError naming it, where, and ``fix``."""
    with open(path) as f:
        text = f.read()
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{os.fspath(path)} is torn or not JSON ({e.msg}: line {e.lineno} column {e.colno}, "
                         f"{len(text)} bytes); {fix}") from None


def check_writable_dir(path: str | os.PathLike, what: str = "directory") -> str:
    """Creates ``path`` if needed and proves a file can be written there; ``WriteError`` naming the cause if not."""
    path = os.path.abspath(os.fspath(path))
    probe = os.path.join(path, f".write-test-{os.getpid()}")
    try:
        os.makedirs(path, exist_ok=True)
        with open(probe, "w") as f:
            f.write("ok")
        os.remove(probe)
    except OSError as e:
        reason = {errno.EACCES: "permission denied", errno.EPERM: "permission denied",
                  errno.EROFS: "read-only file system", errno.ENOSPC: "no space left on the device",
                  errno.ENOTDIR: "a file is in the way"}.get(e.errno, e.strerror or str(e))
        raise WriteError(f"cannot write to the {what} {path!r}: {reason}") from e
    return path


def save_variables(path: str | os.PathLike, variables: Mapping[str, Any], *, model: Any = None,
                   metadata: Optional[Mapping[str, Any]] = None, overwrite: bool = True,
                   inputs: Sequence[str | os.PathLike] = ()) -> str:
    """Write ``variables`` to ``path`` (.safetensors) atomically (see ``write_atomically``); returns the path.

    ``model`` (the ``FastVit`` the variables belong to) records variant, form, num_classes,
    image size and the data config (``pretrained_cfg``) in the header, so that
    ``fastvit_jax.load_model`` needs no arguments; ``metadata`` adds or overrides entries.
    Values that are not strings are stored as JSON. The parent directory is created.
    """
    entries: Dict[str, Any] = dict(model_metadata(model)) if model is not None else {}
    entries.update(metadata or {})
    meta = {"format": FORMAT}
    for k, v in entries.items():
        meta[str(k)] = v if isinstance(v, str) else json.dumps(v)
    flat = flatten_variables(variables)
    directory = os.path.dirname(os.path.abspath(os.fspath(path)))
    try:
        os.makedirs(directory, exist_ok=True)
    except OSError as e:
        raise WriteError(f"cannot create the output directory {directory!r}: {e.strerror}") from e
    return write_atomically(path, lambda tmp: write_safetensors(flat, tmp, metadata=meta), overwrite=overwrite, inputs=inputs,
                            size_hint=sum(a.nbytes for a in flat.values()))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def is_variables_file(keys: Any, metadata: Optional[Mapping[str, str]]) -> bool:
    """True for a file written by ``save_variables`` (its format tag, or '/'-joined Flax keys)."""
    if (metadata or {}).get("format") == FORMAT:
        return True
    keys = list(keys)
    return bool(keys) and all(k.split("/", 1)[0] in ("params", "batch_stats") for k in keys)


def load_variables(path: str | os.PathLike) -> Dict[str, Any]:
    """Read a file written by ``save_variables``: nested dict of numpy arrays.

    A PyTorch state_dict saved as .safetensors (timm's ``model.safetensors``) is refused with a
    pointer to ``fastvit_jax.load_model``, which reads every checkpoint layout.
    """
    path = os.fspath(path)
    if not os.path.exists(path):
        if os.path.islink(path):  # exists() follows links: a loop or a dangling link
            raise FileNotFoundError(f"no variables file at {path!r}: it is a symbolic link to {os.readlink(path)!r}, "
                                    f"which loops back on itself or does not exist")
        raise FileNotFoundError(f"no variables file at {path!r}")
    if os.path.isdir(path):
        raise ValueError(f"{path!r} is a directory, not a variables file")
    if not os.path.isfile(path):
        raise ValueError(f"{path!r} is not a regular file (a FIFO, socket or device)")
    try:
        flat = load_file(path)
        meta = load_metadata(path)
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path!r} is not a safetensors variables file written by save_variables: {e}") from e
    if not is_variables_file(flat, meta):
        raise ValueError(
            f"{path!r} holds a PyTorch-layout state_dict (keys like {next(iter(flat), '?')!r}), not Flax variables; "
            "read it with fastvit_jax.load_model(path) or convert it with convert/torch2flax.py")
    return unflatten_variables(flat)


def load_metadata(path: str | os.PathLike) -> Dict[str, str]:
    """The string metadata stored by ``save_variables``."""
    from safetensors import safe_open

    with safe_open(os.fspath(path), framework="numpy") as f:
        return dict(f.metadata() or {})
