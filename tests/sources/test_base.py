"""CaseSource.read_files (issue 14): each file read once, the same hashes as before."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from pipeline.sources.base import (
    CHANNELS,
    CaseSource,
    VolumeRef,
    file_sha256,
    read_and_hash,
)


def old_file_sha256(path: Path) -> str:
    """The previous implementation's oracle: sha256 of the whole file's bytes."""
    return hashlib.sha256(path.read_bytes()).hexdigest()


def old_content_hash(case: CaseSource) -> str:
    """The content hash as the previous implementation computed it, written out here."""
    h = hashlib.sha256()
    for path in case.files():
        h.update(path.name.encode())
        h.update(old_file_sha256(path).encode())
    h.update(repr(sorted(case.label_map.items())).encode())
    if case.label is not None:
        h.update(repr(case.label.segments).encode())
    h.update(repr(case.annotated_slices).encode())
    return h.hexdigest()


@pytest.fixture
def case(tmp_path: Path, rng) -> CaseSource:
    """Four NIfTI channels of different sizes, a DICOM-series label, odd options."""
    images = {}
    for i, channel in enumerate(CHANNELS):
        path = tmp_path / f"c-{channel}.nii.gz"
        path.write_bytes(rng.bytes(1000 * (i + 1)))  # bytes only: nothing is decoded here
        images[channel] = VolumeRef("nifti", (path,))
    series = []
    for k in range(3):
        path = tmp_path / "seg" / f"{k}.dcm"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(rng.bytes(300))
        series.append(path)
    return CaseSource("c", images, VolumeRef("dicom", tuple(series)), label_map={4: 3},
                      annotated_slices=(2, 5))


class TestIssue14ReadOnce:
    def test_hashes_and_content_hash_equal_the_previous_implementation(self, case):
        files = case.read_files()
        assert files.hashes == {p: old_file_sha256(p) for p in case.files()}
        assert files.hashes == case.file_hashes()
        assert case.content_hash(files.hashes) == old_content_hash(case)
        assert case.content_hash() == old_content_hash(case)

    def test_nifti_bytes_are_kept_and_dicom_files_only_hashed(self, case):
        files = case.read_files()
        nifti = [ref.paths[0] for ref in case.images.values()]
        assert set(files.data) == set(nifti)
        for path in nifti:
            assert files.data[path] == path.read_bytes()

    def test_each_file_is_opened_once(self, case, monkeypatch):
        import builtins
        import io

        opened: list[Path] = []
        real_open = builtins.open

        def counting_open(file, *args, **kwargs):
            opened.append(Path(file) if isinstance(file, (str, Path)) else file)
            return real_open(file, *args, **kwargs)

        monkeypatch.setattr(builtins, "open", counting_open)
        monkeypatch.setattr(io, "open", counting_open)
        case.read_files()
        assert sorted(opened) == sorted(case.files())

    def test_files_beyond_the_budget_are_hashed_but_not_kept(self, case):
        sizes = [ref.paths[0].stat().st_size for ref in case.images.values()]  # 1000..4000
        files = case.read_files(budget=sizes[0] + sizes[1] + 10)
        kept = [ref.paths[0] for ref in list(case.images.values())[:2]]
        assert set(files.data) == set(kept)
        assert files.hashes == {p: old_file_sha256(p) for p in case.files()}

    def test_a_file_over_the_volume_limits_is_not_read_into_memory(self, case, monkeypatch):
        # kept only within XRAI_MAX_VOLUME_BYTES + XRAI_MAX_HEADER_BYTES (here 2000 + 1000)
        monkeypatch.setenv("XRAI_MAX_VOLUME_BYTES", "2000")
        monkeypatch.setenv("XRAI_MAX_HEADER_BYTES", "1000")
        files = case.read_files()
        assert {p.stat().st_size for p in files.data} == {1000, 2000, 3000}
        assert files.hashes == {p: old_file_sha256(p) for p in case.files()}

    def test_a_bad_limit_variable_is_left_to_the_reader(self, case, monkeypatch):
        # the decoder reports it (the case's quarantine reason, as before); hashing goes on
        monkeypatch.setenv("XRAI_MAX_VOLUME_BYTES", "lots")
        files = case.read_files()
        assert files.data == {}
        assert files.hashes == {p: old_file_sha256(p) for p in case.files()}

    def test_a_missing_file_raises_oserror_naming_it(self, case):
        gone = case.images["t2w"].paths[0]
        gone.unlink()
        with pytest.raises(FileNotFoundError, match=r"c-t2w\.nii\.gz") as info:
            case.read_files()
        assert info.value.filename == str(gone)


@pytest.mark.parametrize("size", [0, 1, (1 << 20) - 1, 1 << 20, 3 * (1 << 20) + 17])
@pytest.mark.parametrize("limit", [-1, 0, 1 << 22])
def test_read_and_hash_matches_sha256_of_the_bytes(tmp_path, rng, size, limit):
    path = tmp_path / "f.bin"
    path.write_bytes(rng.bytes(size))
    digest, data = read_and_hash(path, limit=limit)
    assert digest == old_file_sha256(path) == file_sha256(path)
    assert data == (path.read_bytes() if 0 <= size <= limit else None)
