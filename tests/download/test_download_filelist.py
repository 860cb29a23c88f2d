"""Checksummed HTTP file lists (NIfTI collections): parsing, resume, verification."""

from __future__ import annotations

import hashlib
import random
from pathlib import Path

import pytest

from pipeline.download.filelist import FileListFetcher, parse_file_list, plan_filelist
from pipeline.download.http import HttpClient
from pipeline.download.plan import run_plan

from ._fakes import FakeFileServer

RNG = random.Random(7)
FILES = {
    "UCSF-PDGM-0004_nifti/UCSF-PDGM-0004_T1c.nii.gz": RNG.randbytes(150_000),
    "UCSF-PDGM-0004_nifti/UCSF-PDGM-0004_tumor_segmentation.nii.gz": RNG.randbytes(20_000),
    "UCSF-PDGM-0005_nifti/UCSF-PDGM-0005_T1c.nii.gz": RNG.randbytes(90_000),
}


def csv_list(files: dict[str, bytes], *, sizes: bool = True) -> str:
    head = "path,sha256,size" if sizes else "path,sha256"
    rows = [f"{p},{hashlib.sha256(d).hexdigest()}" + (f",{len(d)}" if sizes else "")
            for p, d in files.items()]
    return "\n".join([head, *rows]) + "\n"


@pytest.fixture
def server():
    with FakeFileServer({**FILES, "list.csv": csv_list(FILES).encode()}) as s:
        yield s


def read_tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*.nii.gz")}


class TestParse:
    def test_sha256sum_format_with_base_url(self) -> None:
        text = "".join(f"{hashlib.sha256(d).hexdigest()}  {p}\n" for p, d in FILES.items())
        items = parse_file_list(text, list_name="sums", base_url="http://h/data")
        assert items[0].ref == f"http://h/data/{next(iter(FILES))}"
        assert items[0].patient_id == "UCSF-PDGM-0004_nifti"
        assert items[0].size_bytes is None

    @pytest.mark.parametrize(("text", "message"), [
        ("path,sha256\n../x.nii.gz," + "a" * 64, r"line 2: path '../x.nii.gz' must be relative"),
        ("path,sha256\n/x.nii.gz," + "a" * 64, r"must be relative"),
        ("path,sha256\nx.nii.gz,abc", r"line 2: sha256 'abc' is not 64 hex digits"),
        ("path,sha256,size\nx.nii.gz," + "a" * 64 + ",-1", r"size '-1' is not a whole number"),
        ("name,hash\nx,y", r"lacks \['path', 'sha256'\]"),
    ])
    def test_bad_lists_name_the_line(self, text: str, message: str) -> None:
        with pytest.raises(ValueError, match=message):
            parse_file_list(text, list_name="l.csv", base_url="http://h")

    def test_no_url_and_no_base(self) -> None:
        with pytest.raises(ValueError, match=r"no url column and no base URL"):
            parse_file_list("path,sha256\nx," + "a" * 64, list_name="l.csv", base_url=None)


class TestDownload:
    def test_faults_clear_and_files_are_byte_identical(self, server: FakeFileServer,
                                                       http: HttpClient, tmp_path: Path) -> None:
        first, second, _ = FILES
        server.fault(first, "drop", "500")
        server.fault(second, "corrupt")
        plan = plan_filelist("UCSF-PDGM", f"{server.url}/list.csv", http=http)
        summary = run_plan(plan, FileListFetcher(http), tmp_path)
        assert summary.exit_code == 0, summary.of("failed")
        assert read_tree(tmp_path) == FILES
        ranges = [h.get("Range") for p, _, h in server.log if p == first]
        assert any(r and r != "bytes=0-" for r in ranges)  # resumed, not restarted

    def test_partial_from_an_interrupted_run_is_resumed(self, server: FakeFileServer,
                                                        http: HttpClient, tmp_path: Path) -> None:
        first = next(iter(FILES))
        server.fault(first, *["drop"] * 4)  # the whole run's attempts for this file
        plan = plan_filelist("UCSF-PDGM", f"{server.url}/list.csv", http=http, limit=1)
        assert run_plan(plan, FileListFetcher(http), tmp_path).exit_code == 3
        assert not (tmp_path / first).exists()
        again = run_plan(plan, FileListFetcher(http), tmp_path)
        assert [o.status for o in again.outcomes] == ["downloaded", "skipped"]
        assert (tmp_path / first).read_bytes() == FILES[first]
        resumed = [h.get("Range") for p, _, h in server.log if p == first][-1]
        assert resumed is not None
        assert resumed != "bytes=0-"

    def test_rerun_skips_and_detects_changed_files(self, server: FakeFileServer,
                                                   http: HttpClient, tmp_path: Path) -> None:
        plan = plan_filelist("UCSF-PDGM", f"{server.url}/list.csv", http=http)
        run_plan(plan, FileListFetcher(http), tmp_path)
        again = run_plan(plan, FileListFetcher(http), tmp_path)
        assert {o.status for o in again.outcomes} == {"skipped"}
        victim = tmp_path / next(iter(FILES))
        victim.write_bytes(b"x" * len(FILES[next(iter(FILES))]))  # same size, other bytes
        third = run_plan(plan, FileListFetcher(http), tmp_path)
        assert [o.status for o in third.outcomes] == ["downloaded", "skipped", "skipped"]
        assert read_tree(tmp_path) == FILES

    def test_wrong_checksum_in_list_fails_by_name(self, server: FakeFileServer, http: HttpClient,
                                                  tmp_path: Path) -> None:
        bad = dict(FILES)
        lst = tmp_path / "list.csv"
        text = csv_list(bad).replace(hashlib.sha256(FILES[next(iter(FILES))]).hexdigest(), "0" * 64)
        lst.write_text(text)
        plan = plan_filelist("UCSF-PDGM", str(lst), http=http, base_url=server.url)
        summary = run_plan(plan, FileListFetcher(http), tmp_path / "d")
        failed = summary.of("failed")
        assert [o.item.key for o in failed] == [next(iter(FILES))]
        assert "sha256 is" in failed[0].reason
        assert "0" * 64 in failed[0].reason
        assert summary.exit_code == 3

    def test_patients_filter(self, server: FakeFileServer, http: HttpClient) -> None:
        plan = plan_filelist("UCSF-PDGM", f"{server.url}/list.csv", http=http,
                             patients=["UCSF-PDGM-0005_nifti"])
        assert [i.key for i in plan.items] == ["UCSF-PDGM-0005_nifti/UCSF-PDGM-0005_T1c.nii.gz"]
