"""ImageNet as distributed (class folders, the flat validation split with its label files)
and ImageNet-style class folders."""
from __future__ import annotations

import logging
import os

import torch

from .base import UNLABELLED, _annotation_lines, _Counter, _first_dir
from .files import AnnotationError, OutsideRootError, PathGuard, inside_root, read_csv_rows
from .images import load_image
from .video import IMAGE_EXTENSIONS

log = logging.getLogger("structvit.data")

__all__ = ["ImageFolderDataset", "read_loc_val_solution", "read_devkit_ground_truth"]

_IMAGE_FILE_EXTENSIONS = IMAGE_EXTENSIONS + (".bmp", ".webp")
#: where ImageNet's split folders are, relative to the dataset root: the plain layout and
#: Kaggle's (``ILSVRC/Data/CLS-LOC/{train,val,test}``)
_IMAGENET_SPLIT_BASES = ("", os.path.join("ILSVRC", "Data", "CLS-LOC"))
_DEVKIT_DIRS = ("", "ILSVRC2012_devkit_t12", os.path.join("ILSVRC2012_devkit_t12", "data"), "data", "devkit")


def _is_image(name: str) -> bool:
    return name.lower().endswith(_IMAGE_FILE_EXTENSIONS)


def read_loc_val_solution(path) -> dict[str, str]:
    """``{image id: wnid}`` from ImageNet's ``LOC_val_solution.csv`` (columns ``ImageId,
    PredictionString``; the string is ``wnid x_min y_min x_max y_max`` repeated per box, all
    boxes of one image have its class)."""
    out = {}
    header, rows = read_csv_rows(path)
    if not {"ImageId", "PredictionString"} <= set(header):
        raise AnnotationError(path, f"expected columns ImageId,PredictionString, found {header}", line=1)
    for line, row in rows:
        tokens = (row["PredictionString"] or "").split()
        if not tokens:
            raise AnnotationError(path, f"empty PredictionString for {row['ImageId']!r}", line=line)
        out[(row["ImageId"] or "").strip()] = tokens[0]
    return out


def read_devkit_ground_truth(gt_path, meta_path) -> list[str]:
    """The wnid of every validation image, in file-name order, from the ILSVRC2012 devkit:
    ``ILSVRC2012_validation_ground_truth.txt`` (one 1-based ILSVRC2012_ID per line) and
    ``meta.mat`` (MATLAB; read with scipy) mapping ILSVRC2012_IDs to wnids."""
    try:
        from scipy.io import loadmat
    except ImportError:
        raise ImportError(f"reading {meta_path} (MATLAB) needs scipy: pip install scipy; or give the validation "
                          "labels as LOC_val_solution.csv") from None
    synsets = loadmat(os.fspath(meta_path), squeeze_me=True)["synsets"]
    id_to_wnid = {int(s["ILSVRC2012_ID"]): str(s["WNID"]) for s in synsets}
    out = []
    for where, line in _annotation_lines(os.fspath(gt_path)):
        try:
            out.append(id_to_wnid[int(line)])
        except (ValueError, KeyError):
            raise ValueError(f"{where}: {line!r} is not an ILSVRC2012_ID of {meta_path}") from None
    return out


class ImageFolderDataset(torch.utils.data.Dataset):
    """ImageNet as distributed, and ImageNet-style class folders.

    The split folder is ``{root}/{split}`` or, in Kaggle's layout,
    ``{root}/ILSVRC/Data/CLS-LOC/{split}``.  A split of class folders
    (``{split}/{class}/*.JPEG``) takes its labels from the folder names.  A flat split (the
    validation images as distributed, ``val/ILSVRC2012_val_00000001.JPEG``) takes them from
    ``LOC_val_solution.csv`` (in ``root``) or the devkit's
    ``ILSVRC2012_validation_ground_truth.txt`` with its ``meta.mat`` (in ``root``,
    ``root/ILSVRC2012_devkit_t12/data``); a flat ``test`` split without such a file is
    unlabelled (label :data:`UNLABELLED`, prediction only).

    Classes: the lines of a class list file in ``root`` if there is one
    (``LOC_synset_mapping.txt`` or ``classes.txt``: first token of each line is the
    folder name, the rest its description, kept in ``class_descriptions``), else the
    sorted train-folder names (ImageNet's wnid order) - never the file system's listing
    order.  Folders and labels not in the class list are reported.  Unreadable images are
    replaced by the next one in training (``on_unreadable="replace"``) and skipped
    (``"skip"``: ``__getitem__`` returns None) otherwise.
    """

    def __init__(self, root, split: str = "train", *, transform=None, classes=None, on_unreadable: str = "replace"):
        if on_unreadable not in ("replace", "skip"):
            raise ValueError(f"on_unreadable must be 'replace' or 'skip', got {on_unreadable!r}")
        root = os.fspath(root)
        split_dir = self.split_dir(root, split)
        self.root, self.split = root, split
        self.classes = list(classes) if classes is not None else self.find_classes(root)
        self.class_descriptions = self.find_descriptions(root)
        index = {c: i for i, c in enumerate(self.classes)}
        self.problems = []
        self.samples = []
        subdirs = sorted(d for d in os.listdir(split_dir) if os.path.isdir(os.path.join(split_dir, d)))
        flat = sorted(n for n in os.listdir(split_dir) if _is_image(n) and os.path.isfile(os.path.join(split_dir, n)))
        if subdirs and not flat:
            for d in subdirs:
                p = os.path.join(split_dir, d)
                if d not in index:
                    self.problems.append(f"{p}: folder {d!r} is not a known class")
                    continue
                for dp, _, fnames in sorted(os.walk(p)):
                    for fn in sorted(fnames):
                        if _is_image(fn):
                            self.samples.append((os.path.join(dp, fn), index[d]))
        elif flat:
            self._read_flat(root, split, split_dir, flat, index)
        self.samples = self._inside(self.samples, split_dir)
        if self.problems:
            log.warning("%d image folder problem(s):\n  %s", len(self.problems), "\n  ".join(self.problems[:50]))
        if not self.samples:
            raise ValueError(f"no images found in {split_dir}")
        self.targets = [s[1] for s in self.samples]
        self.transform = transform
        self.loader = load_image
        self._base = split_dir
        self.on_unreadable = on_unreadable
        self._bad = _Counter()
        self.bad_files: list[str] = []
        self.max_retries = 10

    def _inside(self, samples, base) -> list:
        """The samples that resolve (links followed) inside the split folder; the others
        are reported in :attr:`problems`."""
        kept, guard = [], PathGuard()
        for path, label in samples:
            try:
                kept.append((guard(path, base), label))
            except OutsideRootError as e:
                self.problems.append(str(e))
        return kept

    def _read_flat(self, root, split, split_dir, names, index) -> None:
        """Labels of a flat split from the official files (see the class docstring)."""
        solution = next((p for p in (os.path.join(root, "LOC_val_solution.csv"),
                                     os.path.join(split_dir, "LOC_val_solution.csv")) if os.path.isfile(p)), None)
        gt = next((os.path.join(root, d, "ILSVRC2012_validation_ground_truth.txt") for d in _DEVKIT_DIRS
                   if os.path.isfile(os.path.join(root, d, "ILSVRC2012_validation_ground_truth.txt"))), None)
        if split != "test" and solution is not None:
            wnid_of = read_loc_val_solution(solution)
            source = solution
            labels = []
            for n in names:
                stem = os.path.splitext(n)[0]
                if stem not in wnid_of:
                    self.problems.append(f"{os.path.join(split_dir, n)}: not in {solution}")
                labels.append(wnid_of.get(stem))
        elif split != "test" and gt is not None:
            meta = os.path.join(os.path.dirname(gt), "meta.mat")
            if not os.path.isfile(meta):
                raise FileNotFoundError(f"{gt} needs the devkit's meta.mat next to it (ILSVRC2012_ID -> wnid)")
            wnids = read_devkit_ground_truth(gt, meta)
            source = gt
            if len(wnids) != len(names):
                raise ValueError(f"{gt} has {len(wnids)} labels but {split_dir} holds {len(names)} images")
            labels = wnids  # line k is the k-th image in name order (ILSVRC2012_val_%08d)
        elif split == "test":
            for n in names:
                self.samples.append((os.path.join(split_dir, n), UNLABELLED))
            return
        else:
            raise FileNotFoundError(
                f"{split_dir} holds images but no class folders, and no label file was found: expected "
                f"{os.path.join(root, 'LOC_val_solution.csv')} or the devkit's "
                f"ILSVRC2012_validation_ground_truth.txt + meta.mat under {root}")
        for n, wnid in zip(names, labels):
            if wnid is None:
                continue
            if wnid not in index:
                self.problems.append(f"{os.path.join(split_dir, n)}: label {wnid!r} ({source}) is not a known class")
                continue
            self.samples.append((os.path.join(split_dir, n), index[wnid]))

    @staticmethod
    def split_dir(root, split: str) -> str:
        root = os.fspath(root)
        cands = [os.path.join(root, base, split) for base in _IMAGENET_SPLIT_BASES]
        found = _first_dir(cands)
        if found is None:
            raise FileNotFoundError(f"image folder split {split!r} not found; looked for " + ", ".join(cands))
        return found

    @staticmethod
    def _class_list_file(root) -> str | None:
        return next((os.path.join(root, n) for n in ("LOC_synset_mapping.txt", "classes.txt", "synsets.txt")
                     if os.path.isfile(os.path.join(root, n))), None)

    @staticmethod
    def find_classes(root) -> list[str]:
        root = os.fspath(root)
        p = ImageFolderDataset._class_list_file(root)
        if p is not None:
            return [line.split()[0] for _, line in _annotation_lines(p)]
        train = _first_dir([os.path.join(root, base, "train") for base in _IMAGENET_SPLIT_BASES])
        if train is None:
            raise FileNotFoundError(f"no class list file (LOC_synset_mapping.txt, classes.txt) and no train "
                                    f"folder in {root}")
        return sorted(d for d in os.listdir(train) if os.path.isdir(os.path.join(train, d)))

    @staticmethod
    def find_descriptions(root) -> dict[str, str]:
        """``{class: description}`` from the class list file (``n01440764 tench, Tinca tinca``)."""
        p = ImageFolderDataset._class_list_file(os.fspath(root))
        out = {}
        if p is not None:
            for _, line in _annotation_lines(p):
                parts = line.split(maxsplit=1)
                if len(parts) == 2:
                    out[parts[0]] = parts[1]
        return out

    @property
    def num_classes(self):
        return len(self.classes)

    @property
    def num_bad_samples(self):
        return self._bad.value

    @property
    def sample_ids(self) -> list[str]:
        """The image paths relative to the split folder, without extension (``ILSVRC2012_val_00000001``)."""
        base = self.split_dir(self.root, self.split)
        return [os.path.splitext(os.path.relpath(p, base))[0] for p, _ in self.samples]

    def __len__(self):
        return len(self.samples)

    def __getitem__(self, index):
        i, tried = index, []
        for _attempt in range(self.max_retries + 1):
            path, target = self.samples[i]
            try:
                img = self.loader(inside_root(path, self._base))
            except Exception as e:
                self._bad.add()
                self.bad_files.append(path)
                if self.on_unreadable == "skip":
                    log.warning("unreadable image %s (%s) skipped", path, e)
                    return None
                tried.append(f"{path}: {e}")
                j = (i + 1) % len(self)
                log.warning("unreadable image %s (%s); replaced by sample %d", path, e, j)
                i = j
                continue
            return (self.transform(img) if self.transform is not None else img), target
        raise RuntimeError(f"sample {index}: {len(tried)} unreadable images in a row:\n  " + "\n  ".join(tried))

