"""Data for fastcam: readers of the public chest X-ray label files (SPEC §6.1) and an
embedded synthetic multi-label "radiograph" dataset (the data of ``fastcam demo``).

- :func:`read_labels`, :func:`read_boxes`, :class:`LabelTable` (:mod:`fastcam.data.labels`):
  NIH ChestX-ray14, CheXpert, PadChest and a generic CSV format.
- :func:`make_synthetic`, :class:`SyntheticChestXray`, :class:`SyntheticBatch`,
  :data:`SYNTHETIC_CLASSES` (:mod:`fastcam.data.synthetic`): images, labels, masks and boxes
  generated from a seed.
"""

from fastcam.data.labels import CHEXPERT_NON_LABEL_COLUMNS, FORMATS, NIH_CLASSES, LabelTable, read_boxes, read_labels
from fastcam.data.synthetic import CLASSES as SYNTHETIC_CLASSES
from fastcam.data.synthetic import SyntheticBatch, SyntheticChestXray, make_synthetic

__all__ = [
    "CHEXPERT_NON_LABEL_COLUMNS",
    "FORMATS",
    "NIH_CLASSES",
    "SYNTHETIC_CLASSES",
    "LabelTable",
    "SyntheticBatch",
    "SyntheticChestXray",
    "make_synthetic",
    "read_boxes",
    "read_labels",
]
