"""Builders of tiny DICOM MR series and DICOM SEG objects, shared by the I/O and source tests.

Everything is written on the fly with pydicom (and highdicom for SEG); nothing downloads.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)


def oblique_iop(degrees: float) -> tuple[float, ...]:
    """ImageOrientationPatient of an axial plane rotated by ``degrees`` about x then z."""
    a = np.deg2rad(degrees)
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    rx = np.array(
        [[1, 0, 0], [0, np.cos(a / 2), -np.sin(a / 2)], [0, np.sin(a / 2), np.cos(a / 2)]]
    )
    r = rz @ rx
    return (*r[:, 0], *r[:, 1])


@dataclass(frozen=True)
class Series:
    """A written MR series: its files (in slice order), uid, voxel array (k, j, i)."""

    files: tuple[Path, ...]
    uid: str
    array: np.ndarray
    iop: tuple[float, ...]
    origin: tuple[float, float, float]
    pixel_spacing: tuple[float, float]  # (row spacing = along columns, column spacing)
    slice_gap: float

    def datasets(self) -> list[Dataset]:
        return [pydicom.dcmread(p) for p in self.files]

    def position(self, k: int) -> np.ndarray:
        """ImagePositionPatient of slice ``k`` (first voxel's centre), LPS mm."""
        row, col = np.asarray(self.iop[:3]), np.asarray(self.iop[3:])
        return np.asarray(self.origin) + k * self.slice_gap * np.cross(row, col)


def write_mr_series(
    folder: Path,
    *,
    description: str = "AX T1 POST GAD",
    n_slices: int = 4,
    rows: int = 16,
    cols: int = 16,
    iop: Sequence[float] = AXIAL,
    origin: Sequence[float] = (-10.0, 20.0, 30.0),
    pixel_spacing: tuple[float, float] = (0.9, 1.1),
    slice_gap: float = 2.5,
    patient_id: str = "P001",
    study_uid: str | None = None,
    frame_of_reference_uid: str | None = None,
    series_number: int = 1,
    transfer_syntax: str | None = None,
    rescale: tuple[float, float] | None = None,
    seed: int = 0,
) -> Series:
    """Write a single-frame MR series; files are named in reverse slice order.

    Pixel values are random uint16 in [0, 4000) (``seed``). ``transfer_syntax`` compresses
    every slice with pydicom's encoders (e.g. JPEG 2000 lossless). ``rescale`` is
    (slope, intercept).
    """
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    array = rng.integers(0, 4000, size=(n_slices, rows, cols), dtype=np.uint16)
    uid = generate_uid()
    study_uid = study_uid or generate_uid()
    frame_of_reference_uid = frame_of_reference_uid or generate_uid()
    series = Series(
        (), uid, array, tuple(float(v) for v in iop), tuple(origin), pixel_spacing, slice_gap
    )
    files = []
    for k in range(n_slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.MediaStorageSOPClassUID = MRImageStorage
        ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = MRImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID
        ds.Modality = "MR"
        ds.PatientID = patient_id
        ds.PatientName = f"Anon^{patient_id}"
        ds.PatientBirthDate = ""
        ds.PatientSex = "O"
        ds.StudyInstanceUID = study_uid
        ds.StudyDate = "20240101"
        ds.StudyTime = "120000"
        ds.StudyID = "1"
        ds.AccessionNumber = ""
        ds.ReferringPhysicianName = ""
        ds.SeriesInstanceUID = uid
        ds.SeriesNumber = series_number
        ds.SeriesDescription = description
        ds.FrameOfReferenceUID = frame_of_reference_uid
        ds.InstanceNumber = k + 1
        ds.ImagePositionPatient = [float(v) for v in series.position(k)]
        ds.ImageOrientationPatient = [float(v) for v in iop]
        ds.PixelSpacing = list(pixel_spacing)
        ds.SliceThickness = slice_gap
        ds.Rows, ds.Columns = rows, cols
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 0
        if rescale is not None:
            ds.RescaleSlope, ds.RescaleIntercept = rescale
        ds.PixelData = array[k].tobytes()
        if transfer_syntax is not None:
            ds.compress(transfer_syntax, array[k])
        path = folder / f"{n_slices - k:03d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return Series(tuple(files), uid, array, series.iop, series.origin, pixel_spacing, slice_gap)


def write_seg(
    path: Path,
    series: Series,
    masks: dict[str, np.ndarray],
    *,
    segmentation_type: str = "BINARY",
) -> Path:
    """Write a DICOM SEG (highdicom) on ``series`` with one segment per ``masks`` entry.

    ``masks`` maps SegmentLabel to a boolean (k, j, i) array (or float in [0, 1] for
    FRACTIONAL); segment numbers follow the dict order from 1.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    stack = np.stack(list(masks.values()), axis=-1)
    stack = stack.astype(bool) if segmentation_type == "BINARY" else stack.astype(np.float32)
    descriptions = [
        hd.seg.SegmentDescription(
            segment_number=i + 1,
            segment_label=label,
            segmented_property_category=codes.SCT.Tissue,
            segmented_property_type=codes.SCT.Tissue,
            algorithm_type=hd.seg.SegmentAlgorithmTypeValues.MANUAL,
        )
        for i, label in enumerate(masks)
    ]
    seg = hd.seg.Segmentation(
        source_images=series.datasets(),
        pixel_array=stack,
        segmentation_type=segmentation_type,
        segment_descriptions=descriptions,
        series_instance_uid=generate_uid(),
        series_number=300,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="xrai-tests",
        manufacturer_model_name="none",
        software_versions="0",
        device_serial_number="0",
    )
    seg.save_as(path)
    return path
