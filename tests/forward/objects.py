"""Small, valid DICOM objects to forward: a CT series, a binary SEG and a TID 1500 SR."""

from __future__ import annotations

from dataclasses import dataclass

import highdicom as hd
import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sr.codedict import codes
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid


@dataclass(frozen=True)
class ResultObjects:
    ct: list[Dataset]
    seg: hd.seg.Segmentation
    sr: hd.sr.Comprehensive3DSR


def ct_series(slices: int = 3, size: int = 16) -> list[Dataset]:
    study, series, frame = generate_uid(), generate_uid(), generate_uid()
    out = []
    for i in range(slices):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPClassUID = CTImageStorage
        ds.SOPClassUID = CTImageStorage
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame
        ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Forward^Test", "FWD-1", "19700101", "O"
        ds.StudyDate, ds.StudyTime, ds.AccessionNumber, ds.ReferringPhysicianName, ds.StudyID = (
            "20240101",
            "120000",
            "ACC1",
            "",
            "1",
        )
        ds.Modality, ds.SeriesNumber, ds.InstanceNumber, ds.Manufacturer = "CT", 1, i + 1, "test"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.ImagePositionPatient = [0.0, 0.0, float(i) * 5.0]
        ds.ImageOrientationPatient = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]
        ds.PixelSpacing, ds.SliceThickness = [0.5, 0.5], 5.0
        ds.Rows = ds.Columns = size
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024.0, 1.0, "HU"
        ds.KVP, ds.PositionReferenceIndicator = 120, ""
        ds.PixelData = (np.full((size, size), 1064, dtype=np.int16) + i).tobytes()
        out.append(ds)
    return out


def result_objects() -> ResultObjects:
    """A CT series with a SEG (one segment) and a TID 1500 SR on it."""
    ct = ct_series()
    mask = np.zeros((len(ct), ct[0].Rows, ct[0].Columns), dtype=bool)
    mask[1, 4:9, 4:9] = True
    algorithm = hd.AlgorithmIdentificationSequence(
        name="forward-test", version="1.0", family=codes.cid7162.ArtificialIntelligence
    )
    segment = hd.seg.SegmentDescription(
        segment_number=1,
        segment_label="bleed",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Hemorrhage,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm,
        tracking_uid=generate_uid(),
        tracking_id="bleed",
    )
    seg = hd.seg.Segmentation(
        source_images=ct,
        pixel_array=mask,
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[segment],
        series_instance_uid=generate_uid(),
        series_number=9001,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="radtriage",
        manufacturer_model_name="forward-test",
        software_versions="1.0",
        device_serial_number="1",
    )
    observer = hd.sr.ObserverContext(
        observer_type=codes.DCM.Device,
        observer_identifying_attributes=hd.sr.DeviceObserverIdentifyingAttributes(
            uid=generate_uid(), name="forward-test"
        ),
    )
    group = hd.sr.PlanarROIMeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=generate_uid(), identifier="bleed"),
        referenced_region=hd.sr.ImageRegion(
            graphic_type=hd.sr.GraphicTypeValues.POINT,
            graphic_data=np.array([[6.0, 6.0]]),
            source_image=hd.sr.SourceImageForRegion(ct[1].SOPClassUID, ct[1].SOPInstanceUID),
        ),
        finding_type=codes.SCT.Hemorrhage,
    )
    report = hd.sr.MeasurementReport(
        observation_context=hd.sr.ObservationContext(observer_person_context=None, observer_device_context=observer),
        procedure_reported=codes.LN.CTUnspecifiedBodyRegion,
        imaging_measurements=[group],
    )
    sr = hd.sr.Comprehensive3DSR(
        evidence=ct,
        content=report,
        series_instance_uid=generate_uid(),
        series_number=9002,
        sop_instance_uid=generate_uid(),
        instance_number=1,
        manufacturer="radtriage",
    )
    return ResultObjects(ct=ct, seg=seg, sr=sr)
