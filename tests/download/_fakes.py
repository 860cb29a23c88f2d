"""Loopback fakes for the download tests: an NBIA v4 server, a file server, tiny DICOM zips.

The NBIA fake answers like the real API: JSON lists with absent keys for empty fields,
``MM-DD-YYYY`` dates, an empty body for an empty result, HTTP 400 for an unknown
parameter, and ``getImage`` as a chunked zip stream (no Content-Length) carrying
``md5hashes.csv``. Faults are queued per endpoint and consumed one per request.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import socket
import threading
import time
import zipfile
from collections import defaultdict, deque
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlparse

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage

ROOT = "1.2.826.0.1.3680043.8.498.7"
API = "/nbia-api/services/v4"

ALLOWED = {
    "getCollectionValues": set(),
    "getPatient": {"Collection"},
    "getPatientStudy": {"Collection", "PatientID", "StudyInstanceUID"},
    "getSeries": {"Collection", "PatientID", "StudyInstanceUID", "Modality"},
    "getSeriesSize": {"SeriesInstanceUID"},
    "getImage": {"SeriesInstanceUID", "IncludeMD5"},
    "getImageWithMD5Hash": {"SeriesInstanceUID"},
}


def tiny_dicom(patient: str, study: str, series: str, number: int, modality: str = "MR") -> bytes:
    """An 8×8 16-bit DICOM instance, deterministic bytes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MRImageStorage
    meta.MediaStorageSOPInstanceUID = f"{series}.{number}"
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MRImageStorage
    ds.SOPInstanceUID = f"{series}.{number}"
    ds.PatientID = patient
    ds.StudyInstanceUID = study
    ds.SeriesInstanceUID = series
    ds.Modality = modality
    ds.InstanceNumber = number
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.PixelData = (np.arange(64, dtype=np.uint16) * number).tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


@dataclass
class FakeSeries:
    """One series of the fake archive."""

    collection: str
    patient: str
    study: str
    uid: str
    modality: str
    files: dict[str, bytes]
    description: str | None = None
    date: str | None = "03-17-2021"

    def row(self) -> dict[str, object]:
        out: dict[str, object] = {
            "SeriesInstanceUID": self.uid, "StudyInstanceUID": self.study,
            "PatientID": self.patient, "Collection": self.collection, "Modality": self.modality,
            "ImageCount": len(self.files), "FileSize": sum(len(b) for b in self.files.values()),
        }
        if self.description:  # empty fields are absent keys, like the real API
            out["SeriesDescription"] = self.description
        if self.date:
            out["SeriesDate"] = self.date
        return out


def make_archive(n_patients: int = 2, series_per_patient: int = 2, files_per_series: int = 3,
                 collection: str = "UPENN-GBM") -> list[FakeSeries]:
    """A small collection: MR series and one SEG per patient."""
    out = []
    for p in range(1, n_patients + 1):
        patient = f"{collection}-{p:05d}"
        study = f"{ROOT}.{p}"
        for s in range(1, series_per_patient + 1):
            modality = "SEG" if s == series_per_patient else "MR"
            uid = f"{ROOT}.{p}.{s}"
            n = 1 if modality == "SEG" else files_per_series
            files = {f"1-{i:02d}.dcm": tiny_dicom(patient, study, uid, i, modality)
                     for i in range(1, n + 1)}
            out.append(FakeSeries(collection, patient, study, uid, modality, files,
                                  description="T1" if modality == "MR" else None))
    return out


def series_zip(files: dict[str, bytes], *, wrong_md5: str | None = None,
               extra: dict[str, bytes] | None = None) -> bytes:
    """A getImage zip: the files, md5hashes.csv (optionally wrong for one file), extras."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
        rows = ["FileName,MD5Hash"]
        for name, data in files.items():
            digest = hashlib.md5(data).hexdigest()
            if name == wrong_md5:
                digest = "0" * 32
            rows.append(f"{name},{digest}")
        zf.writestr("md5hashes.csv", "\n".join(rows) + "\n")
        for name, data in (extra or {}).items():
            zf.writestr(name, data)
    return buf.getvalue()


class _Server:
    """A ThreadingHTTPServer on 127.0.0.1 in a daemon thread."""

    def __init__(self, handler: type[BaseHTTPRequestHandler]) -> None:
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.httpd.daemon_threads = True
        self.httpd.fake = self  # type: ignore[attr-defined]
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.faults: dict[str, deque[str]] = defaultdict(deque)
        self.log: list[tuple[str, dict[str, list[str]], dict[str, str]]] = []

    @property
    def url(self) -> str:
        host, port = self.httpd.server_address[:2]
        return f"http://{host}:{port}"

    def fault(self, endpoint: str, *names: str) -> None:
        self.faults[endpoint].extend(names)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, fmt: str, *args: object) -> None:  # quiet
        pass

    def handle(self) -> None:
        # the client may give up first (a read timeout in a slow-response test)
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            super().handle()

    @property
    def fake(self):
        return self.server.fake  # type: ignore[attr-defined]

    def send_body(self, status: int, body: bytes, ctype: str = "application/json",
                  headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        self.wfile.write(body)

    def drop(self) -> None:
        self.close_connection = True
        self.wfile.flush()
        self.connection.shutdown(socket.SHUT_RDWR)

    def common_fault(self, fault: str | None) -> bool:
        """Answer the faults every endpoint knows; True when the request is done."""
        if fault == "500":
            self.send_body(500, b"internal error", "text/plain")
            return True
        if fault == "503":
            self.send_body(503, b"unavailable", "text/plain")
            return True
        if fault == "429":
            self.send_body(429, b"slow down", "text/plain", {"Retry-After": "3"})
            return True
        if fault == "slow":
            time.sleep(0.6)
        return False


class FakeNbia(_Server):
    """The NBIA v4 endpoints the client uses, over a list of FakeSeries."""

    def __init__(self, series: list[FakeSeries], *, token: str | None = None,
                 include_md5: bool = True) -> None:
        super().__init__(_NbiaHandler)
        self.series = series
        self.token = token
        self.evil: set[str] = set()
        # False: getImage takes SeriesInstanceUID only (400 for IncludeMD5), as in NBIA's
        # own v4 sources, and the md5 list comes from getImageWithMD5Hash
        self.include_md5 = include_md5

    @property
    def api(self) -> str:
        return self.url + API


class _NbiaHandler(_Handler):
    def do_GET(self) -> None:
        parsed = urlparse(self.path)
        params = parse_qs(parsed.query)
        self.fake.log.append((parsed.path, params, dict(self.headers)))
        if not parsed.path.startswith(API + "/"):
            self.send_body(404, b"not found", "text/plain")
            return
        endpoint = parsed.path[len(API) + 1:]
        if endpoint not in ALLOWED:
            self.send_body(404, b"not found", "text/plain")
            return
        allowed = ALLOWED[endpoint] - (set() if self.fake.include_md5 else {"IncludeMD5"})
        unknown = set(params) - allowed
        if unknown:
            self.send_body(400, f"unknown parameter(s) {sorted(unknown)}".encode(), "text/plain")
            return
        if self.fake.token and self.headers.get("Authorization") != f"Bearer {self.fake.token}":
            self.send_body(401, b"unauthorized", "text/plain")
            return
        queue = self.fake.faults[endpoint]
        fault = queue.popleft() if queue else None
        if self.common_fault(fault):
            return
        one = {k: v[0] for k, v in params.items()}
        series = self.fake.series
        if endpoint == "getCollectionValues":
            rows = [{"Collection": c} for c in sorted({s.collection for s in series})]
        elif endpoint == "getPatient":
            rows = [{"PatientId": p, "Collection": one["Collection"]} for p in sorted(
                {s.patient for s in series if s.collection == one["Collection"]})]
        elif endpoint == "getPatientStudy":
            rows = [{"StudyInstanceUID": s.study, "PatientID": s.patient, "StudyDate": s.date}
                    for s in series if s.collection == one.get("Collection")
                    and s.patient == one.get("PatientID")][:1]
        elif endpoint == "getSeries":
            rows = [s.row() for s in series
                    if s.collection == one.get("Collection")
                    and one.get("PatientID", s.patient) == s.patient
                    and one.get("Modality", s.modality) == s.modality]
        elif endpoint == "getSeriesSize":
            rows = [{"TotalSizeInBytes": str(float(sum(len(b) for b in s.files.values()))),
                     "ObjectCount": len(s.files)}
                    for s in series if s.uid == one["SeriesInstanceUID"]]
        else:
            self.get_image(one, fault)
            return
        body = json.dumps(rows).encode() if rows else b""  # empty result: empty body
        self.send_body(200, body)

    def get_image(self, params: dict[str, str], fault: str | None) -> None:
        match = [s for s in self.fake.series if s.uid == params["SeriesInstanceUID"]]
        if not match:
            self.send_body(200, b"", "application/zip")
            return
        s = match[0]
        if fault == "badmd5":
            data = series_zip(s.files, wrong_md5=next(iter(s.files)))
        elif fault == "evil" or s.uid in self.fake.evil:
            data = series_zip(s.files, extra={"../../evil.dcm": b"owned",
                                              "/tmp/abs.dcm": b"owned"})
        else:
            data = series_zip(s.files)
        if fault == "truncate":
            data = data[: len(data) * 2 // 3]
        self.send_response(200)
        self.send_header("Content-Type", "application/zip")
        self.send_header("Transfer-Encoding", "chunked")  # streamed: no Content-Length
        self.end_headers()
        step = 512
        for i in range(0, len(data), step):
            chunk = data[i:i + step]
            if fault == "drop" and i >= len(data) // 2:
                self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk[: len(chunk) // 2])
                self.drop()
                return
            self.wfile.write(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        self.wfile.write(b"0\r\n\r\n")


class FakeFileServer(_Server):
    """Static files with HTTP Range support; faults: 500, 429, slow, drop, corrupt, norange."""

    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__(_FileHandler)
        self.files = files


class _FileHandler(_Handler):
    def do_GET(self) -> None:
        path = urlparse(self.path).path.lstrip("/")
        self.fake.log.append((path, {}, dict(self.headers)))
        queue = self.fake.faults[path]
        fault = queue.popleft() if queue else None
        if self.common_fault(fault):
            return
        if path not in self.fake.files:
            self.send_body(404, b"not found", "text/plain")
            return
        data = self.fake.files[path]
        if fault == "corrupt":
            data = bytes([data[0] ^ 0xFF]) + data[1:]
        start, status = 0, 200
        rng = self.headers.get("Range")
        if rng and fault != "norange":
            start = int(rng.split("=")[1].split("-")[0])
            if start >= len(data):
                self.send_body(416, b"", "text/plain", {"Content-Range": f"bytes */{len(data)}"})
                return
            status = 206
        body = data[start:]
        self.send_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.end_headers()
        if fault == "drop":
            self.wfile.write(body[: len(body) // 2])
            self.drop()
            return
        self.wfile.write(body)


@dataclass
class Recorder:
    """Records the waits a retrying client asks for, without waiting."""

    waits: list[float] = field(default_factory=list)

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)
