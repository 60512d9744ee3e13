"""The errors of data files, keeping sample paths inside the dataset root, and reading
annotation files so that a parse error names the file, line and column.

A sample path built from an annotation (an id, a relative path, a link in a media folder)
is only used after :func:`inside_root` has resolved it (links followed) and found it inside
the folder the reader was pointed at; one that leaves it raises :class:`OutsideRootError`,
which readers report as a problem of the annotation row and datasets as a bad sample.
"""
from __future__ import annotations

import csv
import io
import json
import os

__all__ = ["DataFileError", "MissingFileError", "CorruptFileError", "OutsideRootError", "UnsupportedImageError",
           "AnnotationError", "inside_root", "PathGuard", "read_text", "text_lines", "load_json", "read_csv_rows"]


class DataFileError(RuntimeError):
    """A data file could not be read; ``.path`` names it."""

    def __init__(self, path, message: str):
        self.path = str(path)
        super().__init__(f"{self.path}: {message}")


class MissingFileError(DataFileError):
    pass


class CorruptFileError(DataFileError):
    pass


class OutsideRootError(DataFileError):
    """A sample path that resolves (links followed) outside the dataset root."""


class UnsupportedImageError(DataFileError):
    """An image whose mode or value range cannot be mapped to 8-bit RGB."""


class AnnotationError(ValueError):
    """An annotation file that does not parse; the message names the file, line and column."""

    def __init__(self, path, message: str, line: int | None = None, column: int | None = None):
        self.path, self.line, self.column = str(path), line, column
        where = self.path + (f" line {line}" if line is not None else "") + (
            f" column {column}" if column is not None else "")
        super().__init__(f"{where}: {message}")


def _within(real: str, base: str) -> bool:
    return real == base or real.startswith(base.rstrip(os.sep) + os.sep)


def _outside(path: str, base: str) -> OutsideRootError:
    return OutsideRootError(path, f"outside the dataset root {base} (a '..' or absolute id, or a link)")


def inside_root(path, root) -> str:
    """``path`` unchanged if it resolves (links followed, ``..`` removed) inside ``root``;
    else :class:`OutsideRootError` naming it.  ``root`` is resolved too, so a dataset root
    (or media folder) that is itself a link to another disk is fine."""
    path = os.fspath(path)
    base = os.path.realpath(os.fspath(root))
    if not _within(os.path.realpath(path), base):
        raise _outside(path, base)
    return path


class PathGuard:
    """:func:`inside_root` for the many samples of one annotation file, without resolving
    each path in full: every folder is resolved once, and a file only when it is a link
    (a file that is not a link lies where its resolved folder is)."""

    def __init__(self):
        self._real: dict[str, str] = {}

    def _realpath(self, folder: str) -> str:
        real = self._real.get(folder)
        if real is None:
            real = self._real[folder] = os.path.realpath(folder)
        return real

    def __call__(self, path, root, *, links: bool = True) -> str:
        """``path`` unchanged if inside ``root``, else :class:`OutsideRootError`.
        ``links=False`` checks the name only (``..``, absolute, a linked folder on the way),
        not whether the file itself is a link: for refusing an id before looking for it."""
        path = os.fspath(path)
        base = self._realpath(os.fspath(root))
        folder, name = os.path.split(path)
        if name in ("", ".", ".."):
            real = os.path.realpath(path)
        elif links and os.path.islink(path):
            real = os.path.realpath(path)
        else:
            real = os.path.join(self._realpath(folder), name)
        if not _within(real, base):
            raise _outside(path, base)
        return path


def read_text(path) -> str:
    """The UTF-8 text of an annotation file; undecodable bytes raise :class:`AnnotationError`
    with their line and column."""
    path = os.fspath(path)
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise AnnotationError(path, f"not UTF-8 text ({e.reason}, byte {data[e.start]:#04x})", line, column) from None


def text_lines(path):
    """``(where, line)`` for every non-empty, stripped line of a text annotation file;
    ``where`` is ``"PATH line K"`` for the problem reports."""
    path = os.fspath(path)
    for i, line in enumerate(read_text(path).splitlines(), start=1):
        line = line.strip()
        if line:
            yield f"{path} line {i}", line


def load_json(path, expected: type | None = None):
    """The parsed JSON of an annotation file; a syntax error raises :class:`AnnotationError`
    with its line and column, and so does a top-level value not of type ``expected``."""
    path = os.fspath(path)
    try:
        value = json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise AnnotationError(path, f"not valid JSON ({e.msg})", e.lineno, e.colno) from None
    if expected is not None and not isinstance(value, expected):
        kind = {dict: "a JSON object", list: "a JSON array"}.get(expected, expected.__name__)
        raise AnnotationError(path, f"expected {kind} at the top level, found {type(value).__name__}")
    return value


def read_csv_rows(path, **reader_kwargs) -> tuple[list[str], list[tuple[int, dict]]]:
    """The header and the ``(line, row dict)`` pairs of a CSV annotation file; a row that
    does not parse raises :class:`AnnotationError` with its line."""
    path = os.fspath(path)
    reader = csv.DictReader(io.StringIO(read_text(path), newline=""), strict=True, **reader_kwargs)
    rows = []
    try:
        header = list(reader.fieldnames or [])
        for row in reader:
            rows.append((reader.line_num, row))
    except csv.Error as e:
        raise AnnotationError(path, f"not valid CSV ({e})", reader.reader.line_num) from None
    return header, rows
