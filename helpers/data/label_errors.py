"""Human validation of the CIFAR test labels (cleanlab/label-errors, Northcutt, Athalye & Mueller, NeurIPS 2021,
Apache-2.0): which test images five Mechanical Turk workers judged to carry a wrong label, and which label they
chose instead.

LABEL_ERRORS = "auto" downloads, for CIFAR-100 / CIFAR-10, the published `*_mturk.json` and the official test
labels (`*_test_set_original_labels.npy`) once into DATA_ROOT/label-errors/, md5-checked; a path names a
`*_mturk.json` the user has; None turns the evidence off. Nothing here raises for a missing network or file:
`resolve_label_errors` returns the table or None, with a note saying why and how to get it.
"""
from __future__ import annotations

import json
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np

from helpers.errors import DataError
from helpers.files.atomic import atomic_path
from helpers.files.digest import file_digest

BASE_URL = "https://raw.githubusercontent.com/cleanlab/label-errors/main"
SUBDIR = "label-errors"
WRONG_BELOW = 3        # a label is wrong when fewer than 3 of the 5 workers chose it
CORRECTABLE_AT = 3     # ... and correctable when at least 3 of 5 chose the guessed label
DOWNLOAD_TIMEOUT_S = 30

# (file name, path in the repository, md5) of the two files each dataset needs: the JSON, then the labels.
FILES: dict[str, tuple[tuple[str, str, str], tuple[str, str, str]]] = {
    "cifar100": (("cifar100_mturk.json", "mturk/cifar100_mturk.json", "3db3b8d09dab272e250834d6fdea145d"),
                 ("cifar100_test_set_original_labels.npy",
                  "original_test_labels/cifar100_test_set_original_labels.npy", "dd8ba88fb8da15b4e4f41fff4187a96a")),
    "cifar10": (("cifar10_mturk.json", "mturk/cifar10_mturk.json", "d3f2217f2bb7fe18eca521458e936602"),
                ("cifar10_test_set_original_labels.npy",
                 "original_test_labels/cifar10_test_set_original_labels.npy", "4628c5fffd22eec530997e53da2e9164")),
}
KNOWN_MD5 = {md5: (name, i) for name, pair in FILES.items() for i, (_, _, md5) in enumerate(pair)}


@dataclass(frozen=True)
class HumanLabels:
    """One row per test image the workers checked (sorted by index); `official` is the whole official test-label
    array in order, when it was found, to check that the loaded test set has the index order of `index`."""
    index: np.ndarray            # int64 test-set index
    given: np.ndarray            # int64 the official (given) label
    guessed: np.ndarray          # int64 the label cleanlab proposed and the workers were asked about
    votes_given: np.ndarray      # int64 0..5 workers who chose the given label
    votes_guessed: np.ndarray    # int64 0..5 workers who chose the guessed label
    is_wrong: np.ndarray         # bool: fewer than WRONG_BELOW chose the given label
    is_correctable: np.ndarray   # bool: at least CORRECTABLE_AT chose the guessed label
    official: Optional[np.ndarray]
    source: str                  # where it came from, for the notes and the report

    def __len__(self) -> int:
        return len(self.index)


def parse_mturk(entries, official: Optional[np.ndarray] = None, source: str = "") -> HumanLabels:
    """The published JSON list (entries with id, given_original_label, our_guessed_label, mturk votes) as arrays."""
    if not isinstance(entries, list):
        raise DataError(f"{source or 'the label-errors file'} is not a list of entries (got {type(entries).__name__}).")
    try:
        rows = sorted((int(e["id"]), int(e["given_original_label"]), int(e["our_guessed_label"]),
                       int(e["mturk"]["given"]), int(e["mturk"]["guessed"])) for e in entries)
    except (KeyError, TypeError, ValueError) as exc:
        raise DataError(f"{source or 'the label-errors file'} has an entry without id, given_original_label, "
                        f"our_guessed_label or mturk votes ({type(exc).__name__}: {exc}).") from exc
    cols = np.array(rows, dtype=np.int64).reshape(-1, 5).T
    if len(np.unique(cols[0])) != cols.shape[1]:
        raise DataError(f"{source or 'the label-errors file'} lists a test image twice.")
    return HumanLabels(index=cols[0], given=cols[1], guessed=cols[2], votes_given=cols[3], votes_guessed=cols[4],
                       is_wrong=cols[3] < WRONG_BELOW, is_correctable=cols[4] >= CORRECTABLE_AT,
                       official=None if official is None else np.asarray(official).astype(np.int64), source=source)


def _checked(path: Path, md5: Optional[str]) -> Path:
    """path, after its md5 matched (when one is expected): a damaged or other file is refused, never used."""
    if md5 is not None and file_digest(path, "md5") != md5:
        raise DataError(f"{path} fails the integrity check (md5 is not the published {md5}): delete it and run "
                        f"again with DOWNLOAD=True, or copy it again from {BASE_URL}.")
    return path


def read_human_labels(json_path, official_path=None, md5: Optional[str] = None,
                      official_md5: Optional[str] = None) -> HumanLabels:
    """Read a *_mturk.json (and the official-labels .npy, when given), md5-checked when the md5s are given.
    Raises DataError for a damaged or malformed file."""
    json_path = _checked(Path(json_path), md5)
    try:
        entries = json.loads(json_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise DataError(f"{json_path} cannot be read as JSON ({exc}).") from exc
    official = None
    if official_path is not None:
        path = _checked(Path(official_path), official_md5)
        try:
            official = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as exc:
            raise DataError(f"{path} cannot be read as a .npy array ({exc}).") from exc
        if official.ndim != 1 or not np.issubdtype(official.dtype, np.integer):
            raise DataError(f"{path} must hold a 1-D integer array of test labels, got {official.shape} {official.dtype}.")
    return parse_mturk(entries, official, source=str(json_path))


def _download(url: str, dest: Path, md5: str) -> None:
    """url -> dest, atomically, kept only when its md5 is the published one."""
    # fetched before the atomic write, so a network error reads as one (atomic_path re-raises OSErrors as
    # output errors)
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as resp:
        data = resp.read()
    with atomic_path(dest) as tmp:
        Path(tmp).write_bytes(data)
        _checked(Path(tmp), md5)   # raising here leaves no file behind


def fetch(folder: Path, name: str, repo_path: str, md5: str, download: bool) -> tuple[Optional[Path], str]:
    """(the cached or freshly downloaded file, "") or (None, why not)."""
    dest = folder / name
    if dest.is_file():
        try:
            return _checked(dest, md5), ""
        except DataError as exc:
            if not download:
                return None, str(exc)
    if not download:
        return None, "DOWNLOAD is False and there is no cached copy"
    try:
        _download(f"{BASE_URL}/{repo_path}", dest, md5)
    except Exception as exc:   # URLError, timeouts, OSError, a wrong md5: all mean "not available now"
        return None, f"the download failed ({type(exc).__name__}: {exc})"
    return dest, ""


def _how_to_get(dataset: str, folder: Path) -> str:
    (jname, jrepo, _), (nname, nrepo, _) = FILES[dataset]
    return (f"To use it offline, put {jname} ({BASE_URL}/{jrepo}) and {nname} ({BASE_URL}/{nrepo}) in {folder}, "
            f"or set LABEL_ERRORS to the path of {jname}.")


def _sibling_official(json_path: Path) -> tuple[Optional[Path], Optional[str]]:
    """The official-labels .npy that goes with a user's JSON: beside it, or in ../original_test_labels/ (the
    repository's layout), with its md5 when the JSON is a known published file."""
    known = KNOWN_MD5.get(file_digest(json_path, "md5"))
    stem = json_path.name.removesuffix("_mturk.json")
    names = [FILES[known[0]][1][0]] if known else [f"{stem}_test_set_original_labels.npy"]
    for folder in (json_path.parent, json_path.parent.parent / "original_test_labels"):
        for name in names:
            if (folder / name).is_file():
                return folder / name, (FILES[known[0]][1][2] if known else None)
    return None, None


def resolve_label_errors(setting, dataset: str, data_root, download: bool) -> tuple[Optional[HumanLabels], str]:
    """LABEL_ERRORS -> (HumanLabels or None, a note: where it came from, or why there is none and how to get it).
    Never raises: label evidence is an extra, not a reason to fail the run."""
    if setting is None or setting is False or str(setting).strip().lower() in ("", "none", "off"):
        return None, "Human label validation: off (LABEL_ERRORS = None)."
    if str(setting).strip().lower() != "auto":
        path = Path(setting).expanduser()
        if not path.is_file():
            return None, f"Human label validation: skipped, LABEL_ERRORS = {str(setting)!r} is not a file."
        try:
            official, official_md5 = _sibling_official(path)
            known = KNOWN_MD5.get(file_digest(path, "md5"))
            return read_human_labels(path, official, official_md5=official_md5), (
                f"Human label validation: {path}" + ("" if known else " (not a published cleanlab file)")
                + ("" if official is not None else "; no official-labels .npy beside it, so the order is checked "
                   "against the labels the file lists") + ".")
        except DataError as exc:
            return None, f"Human label validation: skipped, {exc}"
    if dataset not in FILES:
        return None, (f"Human label validation: none published for {dataset}; the label evidence below is an "
                      f"unvalidated estimate from the model's own probabilities.")
    folder = Path(data_root if data_root is not None else "./data").expanduser() / SUBDIR
    got = []
    for name, repo_path, md5 in FILES[dataset]:
        path, why = fetch(folder, name, repo_path, md5, download)
        if path is None:
            return None, (f"Human label validation: skipped for {dataset}, {name} is not available ({why}). "
                          f"{_how_to_get(dataset, folder)}")
        got.append(path)
    try:
        return read_human_labels(*got), f"Human label validation: cleanlab/label-errors ({folder})."
    except DataError as exc:
        return None, f"Human label validation: skipped, {exc}"


def order_mismatch(labels: np.ndarray, human: HumanLabels) -> Optional[str]:
    """None when the loaded test labels are the official ones in the official order (the first len(labels) of
    them: LIMIT keeps the first N), else why not. Without the official array, the labels the JSON lists for
    the images in range stand in for it."""
    labels = np.asarray(labels, dtype=np.int64)
    if human.official is not None:
        official = human.official
        if len(labels) > len(official):
            return f"the test set has {len(labels)} images, the official one {len(official)}"
        differ = np.flatnonzero(labels != official[:len(labels)])
        if len(differ):
            return (f"{len(differ)} of the {len(labels)} test labels differ from the official order "
                    f"(first at index {int(differ[0])}): reordered, filtered or another dataset")
        return None
    inside = human.index < len(labels)
    differ = np.flatnonzero(labels[human.index[inside]] != human.given[inside])
    if len(differ) or not inside.any():
        return ("the test labels do not match the labels the file lists for those images" if inside.any()
                else "none of the checked images is in the loaded test set")
    return None
