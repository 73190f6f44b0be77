#!/usr/bin/env python3
"""Small DICOM series written with pydicom from a crop of a shared NIfTI CT, for tests/dicom.rs.

Writes into tests/data/dicom/:
  expected.nii.gz          the crop as NIfTI (nibabel), with its own affine: what every good
                           series below must read back to (voxels and world geometry)
  series/                  the crop as one axial CT series (uint16, RescaleIntercept -1024),
                           file names shuffled so that name order is not slice order
  rle/                     the same series, RLE Lossless compressed
  with_localizer/          the series plus a localizer image (another series, set aside)
  missing_slice/           the series without one middle slice (a gap: refused)
  two_series/              the series plus a second CT series in the same folder (refused)
  mr/                      the series labelled as MR (no CT series: refused)

Regenerate (pip: numpy, nibabel, pydicom):
  python3 dev/make-dicom-fixtures.py [--ct ../shared/data/Dataset001_OpenKBP/imagesTr/pt_13_0000.nii.gz]
"""
import argparse
import copy
import pathlib
import random
import shutil

import nibabel as nib
import numpy as np
import pydicom
from pydicom.dataset import FileDataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, RLELossless, generate_uid, CTImageStorage

CROP = (slice(40, 88), slice(44, 84), slice(60, 70))  # 48 x 40 x 10 voxels inside the body


def slice_dataset(crop, affine, k, series_uid, study_uid, frame_uid, modality="CT", image_type=("ORIGINAL", "PRIMARY", "AXIAL")):
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = FileDataset(None, {}, file_meta=meta, preamble=b"\0" * 128)
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study_uid, series_uid, frame_uid
    ds.Modality = modality
    ds.ImageType = list(image_type)
    ds.SeriesDescription = "vox2vec-rs test series"
    ds.PatientID = "anonymous"
    ds.InstanceNumber = k + 1
    # NIfTI voxel (i, j, k) -> RAS; DICOM wants LPS: negate x and y.
    lps = np.diag([-1.0, -1.0, 1.0])
    col0 = lps @ affine[:3, 0]
    col1 = lps @ affine[:3, 1]
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in list(col0 / np.linalg.norm(col0)) + list(col1 / np.linalg.norm(col1))]
    ds.ImagePositionPatient = [f"{v:.4f}" for v in lps @ (affine @ np.array([0.0, 0.0, k, 1.0]))[:3]]
    ds.PixelSpacing = [f"{np.linalg.norm(col1):.6f}", f"{np.linalg.norm(col0):.6f}"]  # row spacing (along j), column spacing (along i)
    ds.SliceThickness = f"{np.linalg.norm(affine[:3, 2]):.4f}"
    ds.Rows, ds.Columns = crop.shape[1], crop.shape[0]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope, ds.RescaleIntercept = "1", "-1024"
    ds.PixelData = (crop[:, :, k].T.astype(np.int32) + 1024).astype(np.uint16).tobytes()  # rows = j, columns = i
    return ds


def main():
    root = pathlib.Path(__file__).resolve().parent.parent
    ap = argparse.ArgumentParser()
    ap.add_argument("--ct", default=str(root.parent / "shared/data/Dataset001_OpenKBP/imagesTr/pt_13_0000.nii.gz"))
    ap.add_argument("--out", default=str(root / "tests/data/dicom"))
    a = ap.parse_args()
    out = pathlib.Path(a.out)
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    im = nib.load(a.ct)
    data = np.asarray(im.dataobj)[CROP].astype(np.int16)
    affine = im.affine.copy()
    affine[:3, 3] = (im.affine @ np.array([CROP[0].start, CROP[1].start, CROP[2].start, 1.0]))[:3]
    nib.save(nib.Nifti1Image(data, affine), str(out / "expected.nii.gz"))
    rng = random.Random(0)
    study, frame = generate_uid(), generate_uid()

    def write_series(folder, series_uid=None, skip=(), modality="CT", compress=False):
        folder.mkdir(exist_ok=True)
        series_uid = series_uid or generate_uid()
        names = [f"{rng.getrandbits(40):010x}.dcm" for _ in range(data.shape[2])]
        for k in range(data.shape[2]):
            if k in skip:
                continue
            ds = slice_dataset(data, affine, k, series_uid, study, frame, modality)
            if compress:
                ds.compress(RLELossless)
            ds.save_as(folder / names[k], enforce_file_format=True)

    write_series(out / "series")
    write_series(out / "rle", compress=True)
    write_series(out / "with_localizer")
    loc = slice_dataset(data, affine, 5, generate_uid(), study, frame, image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    loc.save_as(out / "with_localizer" / "localizer.dcm", enforce_file_format=True)
    write_series(out / "missing_slice", skip={4})
    write_series(out / "two_series")
    write_series(out / "two_series")
    write_series(out / "mr", modality="MR")
    n = sum(1 for _ in out.rglob("*.dcm"))
    print(f"{out}: expected.nii.gz {data.shape} and {n} DICOM files")


if __name__ == "__main__":
    main()
