"""Readers for the label files of the public chest X-ray sets (SPEC §6.1).

:func:`read_labels` reads a label CSV as it is distributed into a :class:`LabelTable`
(image paths, class names, a 0/1 label tensor and a mask of the known entries);
:func:`read_boxes` reads the NIH ChestX-ray14 ``BBox_List_2017.csv``.

Formats (``format=``; None tells the format from the header):

``"nih"``
    ``Data_Entry_2017.csv``: ``Image Index`` and ``Finding Labels`` (``Effusion|Mass``,
    ``No Finding``); the 14 findings in the order of the ChestX-ray14 paper
    (:data:`NIH_CLASSES`); ``No Finding`` is all zeros; every entry is known. ``Infiltrate``
    (the box file's spelling) is read as ``Infiltration``. An unknown finding, an empty
    field or entry (``Mass||Nodule``) and ``No Finding`` together with a finding are
    errors. Other columns (``Follow-up #``, ...) are ignored.
``"chexpert"``
    ``train.csv``/``valid.csv``: ``Path``, the non-label columns ``Sex``, ``Age``,
    ``Frontal/Lateral``, ``AP/PA`` (ignored), then one column per observation with
    ``1.0``, ``0.0``, ``-1.0`` or blank. Classes in column order; blank is 0 and known
    (not mentioned); -1 (uncertain) follows ``uncertain``: ``"ignore"`` (unknown, the
    default), ``"ones"`` (known 1) or ``"zeros"`` (known 0). Any other value is an error.
``"padchest"``
    ``PADCHEST_chest_x_ray_images_labels_160K_01.02.19.csv``: ``ImageID``, ``ImageDir`` and
    ``Labels`` holding a Python list literal (``['pleural effusion', 'cardiomegaly']``, read
    with :func:`ast.literal_eval`, never ``eval``). Labels are stripped of surrounding
    spaces; ``normal`` and empty strings are no class. The classes are every other label of
    the file, sorted, unless ``classes`` is given: then labels outside ``classes`` are
    dropped (the row stays known for the given classes). A row whose ``Labels`` is not a
    list of strings (blank, ``nan``, a syntax error) is unlabeled: its mask is all False,
    and one :class:`UserWarning` counts such rows. Paths are ``ImageDir/ImageID``.
``"generic"``
    a ``path`` column and one column per class holding ``1``, ``0`` (``1.0``/``0.0`` too) or
    blank; blank is unknown. Any other value (``-1`` included) is an error.

Errors: a missing file raises :class:`FileNotFoundError`; an unknown format, a missing
column, a malformed row or an unknown class name raise :class:`ValueError`. Every message
starts with the file's path and names the place: ``data row N (line L)``, where ``N``
counts the data rows from 1 (the header is not a data row) and ``L`` is the line of the
file where that row ends (the header is line 1), or ``line 1 (header)``; and the column by
its header name. Files are read as UTF-8 with or without a byte-order mark; blank lines
are skipped; surrounding spaces of header names and fields are ignored.
"""

from __future__ import annotations

import ast
import csv
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

__all__ = ["CHEXPERT_NON_LABEL_COLUMNS", "FORMATS", "NIH_CLASSES", "LabelTable", "read_boxes", "read_labels"]

#: The 14 ChestX-ray14 findings, in the order of the paper (Wang et al., CVPR 2017).
NIH_CLASSES: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia",
    "Pneumothorax", "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia",
)
#: Finding names of the NIH files that stand for one of :data:`NIH_CLASSES`.
NIH_ALIASES: dict[str, str] = {"Infiltrate": "Infiltration"}
#: Columns of the CheXpert CSVs that are not observations.
CHEXPERT_NON_LABEL_COLUMNS: tuple[str, ...] = ("Sex", "Age", "Frontal/Lateral", "AP/PA")
#: The values of ``format=``.
FORMATS: tuple[str, ...] = ("nih", "chexpert", "padchest", "generic")
_UNCERTAIN = ("ignore", "ones", "zeros")
_NO_FINDING = "No Finding"
_PADCHEST_NO_CLASS = ("normal", "")


@dataclass(frozen=True)
class LabelTable:
    """The labels of one CSV file.

    Attributes:
        paths: image paths as written in the file (relative to an image root), one per row.
        classes: the class names, one per column of ``labels``.
        labels: float32 tensor ``[N, C]``, 1 where the finding is present, 0 where it is
            absent or unknown.
        mask: bool tensor ``[N, C]``, True where the label is known.
    """

    paths: list[str]
    classes: list[str]
    labels: torch.Tensor
    mask: torch.Tensor

    def __len__(self) -> int:
        return len(self.paths)


class _Csv:
    """A CSV file read row by row, with the header's columns and messages that name the place."""

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = os.fspath(path)
        if not os.path.exists(self.path):
            raise FileNotFoundError(f"{self.path}: no such file")
        if os.path.isdir(self.path):
            raise IsADirectoryError(f"{self.path}: is a directory, not a CSV file")
        self.header: list[str] = []
        self.data_row = 0  # 1-based index of the current data row
        self.line = 1  # line of the file where the current row ends

    def where(self, column: str | None = None) -> str:
        place = f"{self.path}: data row {self.data_row} (line {self.line})"
        return place + (f", column {column!r}" if column is not None else "")

    def header_error(self, message: str) -> ValueError:
        return ValueError(f"{self.path}: line 1 (header): {message}; the columns are {self.header}")

    def column(self, *names: str) -> int:
        """Index of the first of ``names`` that the header has (a header name appearing twice is an error)."""
        for name in names:
            found = [i for i, h in enumerate(self.header) if h == name]
            if len(found) > 1:
                raise self.header_error(f"column {name!r} appears {len(found)} times")
            if found:
                return found[0]
        raise self.header_error(f"missing column {names[0]!r}")

    def __enter__(self) -> _Csv:
        self._file = open(self.path, newline="", encoding="utf-8-sig")
        try:
            self._reader = csv.reader(self._file)
            header = self._next()
            if header is None or not any(h.strip() for h in header):
                raise ValueError(f"{self.path}: line 1: no header (the file is empty)")
            self.header = [h.strip() for h in header]
        except BaseException:
            self._file.close()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self._file.close()

    def _next(self) -> list[str] | None:
        try:
            return next(self._reader)
        except StopIteration:
            return None
        except csv.Error as e:
            raise ValueError(f"{self.path}: line {self._reader.line_num}: {e}") from None
        except UnicodeDecodeError as e:
            raise ValueError(f"{self.path}: after line {self._reader.line_num}: not UTF-8 text ({e})") from None

    def rows(self) -> Iterator[list[str]]:
        """The data rows (lists of fields) after the header; blank lines are skipped."""
        while (row := self._next()) is not None:
            if not any(field.strip() for field in row):
                continue
            self.data_row += 1
            self.line = self._reader.line_num
            yield row

    def field(self, row: list[str], index: int, *, required: bool = True) -> str:
        """The stripped field ``index`` of ``row``; a row too short for it is malformed."""
        if index >= len(row):
            raise ValueError(f"{self.where(self.header[index])}: the row has {len(row)} fields, "
                             f"the header {len(self.header)}")
        value = row[index].strip()
        if required and not value:
            raise ValueError(f"{self.where(self.header[index])}: empty value")
        return value


def _select(available: Sequence[str], classes: Sequence[str] | None, path: str, what: str) -> list[str]:
    """``classes`` checked against ``available`` (all of ``available`` when None)."""
    if classes is None:
        return list(available)
    if isinstance(classes, str):
        raise TypeError(f"classes must be a sequence of class names, not the string {classes!r}")
    classes = list(classes)
    if not classes:
        raise ValueError(f"{path}: classes is empty")
    for name in classes:
        if not isinstance(name, str):
            raise TypeError(f"classes must hold strings; got {name!r}")
        if classes.count(name) > 1:
            raise ValueError(f"{path}: class {name!r} is given twice in classes")
        if name not in available:
            raise ValueError(f"{path}: unknown class {name!r} in classes; the {what} are {list(available)}")
    return classes


def _table(paths: list[str], classes: list[str], positives: list[tuple[int, int]],
            unknown: list[tuple[int, int]], unlabeled_rows: list[int]) -> LabelTable:
    n, c = len(paths), len(classes)
    labels = torch.zeros(n, c, dtype=torch.float32)
    mask = torch.ones(n, c, dtype=torch.bool)
    if positives:
        idx = torch.tensor(positives, dtype=torch.long)
        labels[idx[:, 0], idx[:, 1]] = 1.0
    if unknown:
        idx = torch.tensor(unknown, dtype=torch.long)
        mask[idx[:, 0], idx[:, 1]] = False
    if unlabeled_rows:
        mask[torch.tensor(unlabeled_rows, dtype=torch.long)] = False
    labels[~mask] = 0.0
    return LabelTable(paths=paths, classes=classes, labels=labels, mask=mask)


def _read_nih(f: _Csv, classes: Sequence[str] | None) -> LabelTable:
    i_path, i_labels = f.column("Image Index"), f.column("Finding Labels")
    selected = _select(NIH_CLASSES, classes, f.path, "NIH findings")
    col = {name: j for j, name in enumerate(selected)}
    paths: list[str] = []
    positives: list[tuple[int, int]] = []
    for row in f.rows():
        r = len(paths)
        paths.append(f.field(row, i_path))
        text = f.field(row, i_labels)
        names = [name.strip() for name in text.split("|")]
        if _NO_FINDING in names:
            if len(names) > 1:
                raise ValueError(f"{f.where('Finding Labels')}: {_NO_FINDING!r} together with findings: {text!r}")
            continue
        for name in names:
            if not name:
                raise ValueError(f"{f.where('Finding Labels')}: empty finding name in {text!r}")
            name = NIH_ALIASES.get(name, name)
            if name not in NIH_CLASSES:
                raise ValueError(f"{f.where('Finding Labels')}: unknown finding {name!r}; "
                                 f"the NIH findings are {list(NIH_CLASSES)} and {_NO_FINDING!r}")
            if name in col:
                positives.append((r, col[name]))
    return _table(paths, selected, positives, [], [])


def _number(f: _Csv, value: str, column: str, allowed: tuple[float, ...]) -> float:
    try:
        x = float(value)
    except ValueError:
        x = math.nan
    if x not in allowed:
        raise ValueError(f"{f.where(column)}: value {value!r} is not one of "
                         f"{', '.join(repr(str(a)) for a in allowed)} or blank")
    return x


def _read_columns(f: _Csv, path_column: str, skip: Sequence[str], classes: Sequence[str] | None,
                  uncertain: str, blank_known: bool) -> LabelTable:
    """chexpert and generic: a path column and one column of numbers per class."""
    i_path = f.column(path_column)
    available = [h for i, h in enumerate(f.header) if i != i_path and h and h not in skip]
    if not available:
        raise f.header_error("no label columns")
    selected = _select(available, classes, f.path, "label columns")
    index = [f.column(name) for name in selected]
    allowed = (1.0, 0.0, -1.0) if blank_known else (1.0, 0.0)
    paths: list[str] = []
    positives: list[tuple[int, int]] = []
    unknown: list[tuple[int, int]] = []
    for row in f.rows():
        r = len(paths)
        paths.append(f.field(row, i_path))
        for j, (name, i) in enumerate(zip(selected, index)):
            value = f.field(row, i, required=False)
            if not value:
                if not blank_known:
                    unknown.append((r, j))
                continue
            x = _number(f, value, name, allowed)
            if x == -1.0:
                x = {"ignore": None, "ones": 1.0, "zeros": 0.0}[uncertain]
                if x is None:
                    unknown.append((r, j))
                    continue
            if x == 1.0:
                positives.append((r, j))
    return _table(paths, selected, positives, unknown, [])


def _read_padchest(f: _Csv, classes: Sequence[str] | None) -> LabelTable:
    i_id, i_dir, i_labels = f.column("ImageID"), f.column("ImageDir"), f.column("Labels")
    paths: list[str] = []
    row_labels: list[list[str] | None] = []
    unparsable: list[int] = []
    for row in f.rows():
        image_id, image_dir = f.field(row, i_id), f.field(row, i_dir)
        paths.append(f"{image_dir}/{image_id}")
        text = f.field(row, i_labels, required=False)
        try:
            parsed = ast.literal_eval(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            parsed = None
        if isinstance(parsed, (list, tuple)) and all(isinstance(x, str) for x in parsed):
            row_labels.append([x.strip() for x in parsed if x.strip() not in _PADCHEST_NO_CLASS])
        else:
            row_labels.append(None)
            unparsable.append(f.data_row)
    if classes is None:
        selected = sorted({name for names in row_labels if names for name in names})
    else:
        selected = _select(list(classes), classes, f.path, "classes")
    col = {name: j for j, name in enumerate(selected)}
    positives = [(r, col[name]) for r, names in enumerate(row_labels) if names for name in names if name in col]
    unlabeled = [r for r, names in enumerate(row_labels) if names is None]
    if unparsable:
        warnings.warn(f"{f.path}: column 'Labels' could not be parsed as a list of strings in {len(unparsable)} "
                      f"row(s) (data rows {unparsable[:5]}{' ...' if len(unparsable) > 5 else ''}); "
                      "they are unlabeled (mask all False)", UserWarning, stacklevel=3)
    return _table(paths, selected, positives, [], unlabeled)


def _detect(f: _Csv) -> str:
    """The format of a label file, told from its header."""
    has = set(f.header)
    if {"Image Index", "Finding Labels"} <= has:
        return "nih"
    if {"ImageID", "ImageDir", "Labels"} <= has:
        return "padchest"
    if "Path" in has:
        return "chexpert"
    if "path" in has:
        return "generic"
    raise f.header_error("cannot tell the format (no 'Image Index' and 'Finding Labels', 'ImageID', 'ImageDir' "
                         "and 'Labels', 'Path' or 'path' column); pass format=")


def read_labels(csv_path: str | os.PathLike, format: str | None = None, uncertain: str = "ignore",
                classes: Sequence[str] | None = None) -> LabelTable:
    """Read a chest X-ray label CSV into a :class:`LabelTable` (SPEC §6.1).

    Args:
        csv_path: the CSV file, as distributed (UTF-8, with or without a byte-order mark).
        format: ``"nih"`` (ChestX-ray14 ``Data_Entry_2017.csv``), ``"chexpert"``
            (``train.csv``/``valid.csv``), ``"padchest"`` (the PadChest labels CSV) or
            ``"generic"`` (a ``path`` column and one 1/0/blank column per class); see the
            module docstring for each format's rules. None (the default) tells the format
            from the header: ``Image Index`` and ``Finding Labels`` make ``nih``, ``Path``
            ``chexpert``, ``ImageID``, ``ImageDir`` and ``Labels`` ``padchest``, ``path``
            ``generic``.
        uncertain: what a CheXpert ``-1.0`` (uncertain) becomes: ``"ignore"`` (unknown: mask
            False, label 0), ``"ones"`` (known 1) or ``"zeros"`` (known 0). Only CheXpert
            files hold uncertain entries; the argument is checked for every format.
        classes: the classes to keep, in this order. For ``nih`` they must be NIH findings,
            for ``chexpert`` and ``generic`` label columns of the file (an unknown name is a
            ``ValueError``); findings of the file outside ``classes`` are left out. For
            ``padchest`` any names: labels of the file outside ``classes`` are dropped. None
            keeps every class (``nih``: the 14 findings in the paper's order; ``chexpert``,
            ``generic``: the label columns in file order; ``padchest``: the file's labels,
            sorted).

    Returns:
        a :class:`LabelTable`: ``paths`` as written in the file (PadChest:
        ``ImageDir/ImageID``), ``classes``, ``labels`` float32 ``[N, C]`` 0/1 (0 where
        unknown) and ``mask`` bool ``[N, C]`` (True where known).

    Raises:
        FileNotFoundError: ``csv_path`` does not exist.
        ValueError: an unknown ``format`` or ``uncertain``, a missing column, a malformed row,
            an unknown finding or class name; the message names the file, the row
            (``data row N (line L)``: N counts data rows from 1, L lines from the header's 1)
            and the column.
    """
    path = os.fspath(csv_path)
    if format is not None and format not in FORMATS:
        raise ValueError(f"{path}: unknown format {format!r}; expected one of {list(FORMATS)}")
    if uncertain not in _UNCERTAIN:
        raise ValueError(f"{path}: unknown uncertain={uncertain!r}; expected one of {list(_UNCERTAIN)}")
    with _Csv(path) as f:
        if format is None:
            format = _detect(f)
        if format == "nih":
            return _read_nih(f, classes)
        if format == "chexpert":
            return _read_columns(f, "Path", CHEXPERT_NON_LABEL_COLUMNS, classes, uncertain, blank_known=True)
        if format == "padchest":
            return _read_padchest(f, classes)
        return _read_columns(f, "path", (), classes, uncertain, blank_known=False)


def read_boxes(bbox_csv_path: str | os.PathLike,
               classes: Sequence[str] | None = None) -> dict[str, list[tuple[int, float, float, float, float]]]:
    """Read the NIH ChestX-ray14 ``BBox_List_2017.csv`` (SPEC §6.1).

    The file's columns are ``Image Index``, ``Finding Label`` and the box split by the
    header's commas into ``Bbox [x``, ``y``, ``w``, ``h]`` (plain ``x``, ``y``, ``w``, ``h``
    are accepted too); trailing unnamed columns are ignored. The file's ``Infiltrate`` is
    the labels' ``Infiltration``.

    Args:
        bbox_csv_path: the CSV file.
        classes: the class names the indices refer to, e.g. ``read_labels(...).classes``;
            None means :data:`NIH_CLASSES`. A box of an NIH finding that is not in
            ``classes`` (a subset was selected) is left out.

    Returns:
        a dict: image name (``Image Index``) -> list of ``(class index, x, y, w, h)``, the
        box's top-left corner, width and height in original-image pixels, in file order.
        Images without a box are not in the dict.

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: a missing column; a finding name that is neither in ``classes`` nor an
            NIH finding; a coordinate that is not a finite number, or a width or height
            that is not positive. The message names the file, the row (``data row N (line
            L)``) and the column.
    """
    if isinstance(classes, str):
        raise TypeError(f"classes must be a sequence of class names, not the string {classes!r}")
    names = list(NIH_CLASSES if classes is None else classes)
    col = {name: j for j, name in enumerate(names)}
    with _Csv(bbox_csv_path) as f:
        i_image, i_label = f.column("Image Index"), f.column("Finding Label")
        i_box = [f.column("Bbox [x", "x"), f.column("y"), f.column("w"), f.column("h]", "h")]
        boxes: dict[str, list[tuple[int, float, float, float, float]]] = {}
        for row in f.rows():
            image = f.field(row, i_image)
            name = f.field(row, i_label)
            name = name if name in col else NIH_ALIASES.get(name, name)
            if name not in col:
                if name in NIH_CLASSES:
                    continue
                raise ValueError(f"{f.where(f.header[i_label])}: unknown finding {name!r}; the classes are {names}")
            xywh = []
            for i in i_box:
                value = f.field(row, i)
                try:
                    x = float(value)
                except ValueError:
                    x = math.nan
                if not math.isfinite(x):
                    raise ValueError(f"{f.where(f.header[i])}: {value!r} is not a finite number")
                xywh.append(x)
            if xywh[2] <= 0 or xywh[3] <= 0:
                raise ValueError(f"{f.where(f.header[i_box[2] if xywh[2] <= 0 else i_box[3]])}: "
                                 f"the box {xywh} has no area")
            boxes.setdefault(image, []).append((col[name], *xywh))
    return boxes
