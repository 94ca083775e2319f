"""Image-folder datasets: ``--dataset /path/to/folder`` (or ``folder:/path``), no preparation step.

Layout (torchvision's ImageFolder, one folder per class, the class names sorted give the labels):

    folder/train/<class name>/*.jpg|jpeg|png|bmp|gif
    folder/val/<class name>/...        (or validation/ or test/)

The validation split must use the same class folders as train (a class may be missing there).
Files are read in sorted order, so the example order is a pure function of the folder's
contents: the train pipeline's exact resume holds as for tfds datasets. Each process reads a
contiguous slice (sizes differ by at most one, like ``tfds.even_splits``). Images are read as
encoded bytes and decoded by the same pipeline as tfds records (JPEG-only folders use the
fused crop-and-decode).
"""

from __future__ import annotations

import dataclasses
import os
from typing import List, Optional, Sequence, Tuple

import tensorflow as tf

FOLDER_PREFIX = "folder:"
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif")
EVAL_SPLIT_NAMES = ("val", "validation", "test")


class FolderDatasetError(FileNotFoundError):
    """The folder does not have the layout above; the message says what is missing."""


def folder_path(name: str) -> Optional[str]:
    """The folder a --dataset value names, else None (a tfds name, which may hold '/': 'name/config').

    'folder:PATH', an absolute or ~ or ./ path, or an existing directory name a folder.
    """
    if name.startswith(FOLDER_PREFIX):
        return os.path.expanduser(name[len(FOLDER_PREFIX):])
    if name.startswith(("/", "~", "./", "../")) or os.path.isdir(name):
        return os.path.expanduser(name)
    return None


def _images(directory: str) -> List[str]:
    return sorted(os.path.join(directory, n) for n in os.listdir(directory)
                  if n.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(directory, n)))


def _class_folders(split_dir: str) -> List[str]:
    return sorted(n for n in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, n)))


@dataclasses.dataclass(frozen=True)
class ImageFolderDataset:
    """The files and labels of a folder dataset's train and eval splits (see the module docstring)."""

    root: str
    class_names: Tuple[str, ...]
    eval_split: str
    files: dict  # split -> ((path, label), ...) in sorted order

    @property
    def jpeg(self) -> bool:
        return all(p.lower().endswith((".jpg", ".jpeg")) for split in self.files.values() for p, _ in split)

    def num_examples(self, split: str) -> int:
        return len(self.files[split])

    def slice_sizes(self, split: str, process_count: int) -> List[int]:
        n = self.num_examples(split)
        return [n // process_count + (1 if i < n % process_count else 0) for i in range(process_count)]

    def read(self, split: str, process_index: int = 0, process_count: int = 1) -> tf.data.Dataset:
        """Encoded examples ``{'image': string, 'label': int64}`` of this process's contiguous slice, in order."""
        sizes = self.slice_sizes(split, process_count)
        start = sum(sizes[:process_index])
        chosen = self.files[split][start:start + sizes[process_index]]
        paths = tf.constant([p for p, _ in chosen] or [""], tf.string)[:len(chosen)]
        labels = tf.constant([label for _, label in chosen] or [0], tf.int64)[:len(chosen)]
        return tf.data.Dataset.from_tensor_slices((paths, labels)).map(
            lambda path, label: {"image": tf.io.read_file(path), "label": label}, deterministic=True)


def load_image_folder(root: str) -> ImageFolderDataset:
    """Scans ``root``; FolderDatasetError names what is missing (split folder, class folders, images)."""
    if not os.path.isdir(root):
        raise FolderDatasetError(f"--dataset folder {root!r} does not exist or is not a directory")
    train_dir = os.path.join(root, "train")
    eval_name = next((n for n in EVAL_SPLIT_NAMES if os.path.isdir(os.path.join(root, n))), None)
    if not os.path.isdir(train_dir) or eval_name is None:
        raise FolderDatasetError(
            f"--dataset folder {root!r} needs a train/ and a val/ (or validation/, test/) subfolder, each with one "
            f"folder of images per class; it has {sorted(os.listdir(root))}")
    class_names = _class_folders(train_dir)
    if not class_names:
        raise FolderDatasetError(f"{train_dir} has no class folders (train/<class name>/<images>)")
    eval_dir = os.path.join(root, eval_name)
    unknown = sorted(set(_class_folders(eval_dir)) - set(class_names))
    if unknown:
        raise FolderDatasetError(f"{eval_dir} has class folders that train/ lacks: {unknown[:5]}")
    files = {"train": _labelled_images(train_dir, class_names), eval_name: _labelled_images(eval_dir, class_names)}
    for split, examples in files.items():
        if not examples:
            raise FolderDatasetError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in {os.path.join(root, split)}/*/")
    return ImageFolderDataset(os.path.abspath(root), tuple(class_names), eval_name, files)


def _labelled_images(split_dir: str, class_names: Sequence[str]) -> Tuple[Tuple[str, int], ...]:
    return tuple((path, label) for label, name in enumerate(class_names)
                 if os.path.isdir(os.path.join(split_dir, name))
                 for path in _images(os.path.join(split_dir, name)))
