"""Data: one episode model over LIBERO HDF5, any HDF5 layout, and LeRobot v2.1 / v3.0."""

from vlatune.data.episode import DataError, DatasetInfo, DatasetReader, Episode, FeatureSpec
from vlatune.data.io import FORMATS, detect_format, open_dataset

__all__ = [
    "FORMATS",
    "DataError",
    "DatasetInfo",
    "DatasetReader",
    "Episode",
    "FeatureSpec",
    "detect_format",
    "open_dataset",
]
