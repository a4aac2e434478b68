"""The real download, verification and extraction code against a loopback HTTP server."""

import io
import tarfile
import zipfile

import numpy as np
import pytest
from PIL import Image

from deeplab.config import DatasetConfig
from deeplab.data import DataError, read_image, read_label, read_list
from deeplab.datasets import DATASETS, check_layout, class_names, read_mat_label, split_items
from deeplab.download import (
    SOURCES,
    Archive,
    DownloadError,
    archive_problem,
    download,
    extract,
    fetch,
    fetch_dataset,
)
from tests.official_layouts import (
    ArchiveServer,
    _tar,
    cocostuff10k_archive,
    cocostuff164k_archives,
    mat_bytes,
    md5,
    voc_archives,
)


@pytest.fixture
def server():
    with ArchiveServer() as s:
        yield s


def test_sources_table_holds_every_dataset_once():
    # Each dataset's archives are in its one entry; SOURCES holds the other downloads only.
    assert {n for n, d in DATASETS.items() if d.archives} == {"voc12", "cocostuff10k", "cocostuff164k", "coco21"}
    assert "caffemodel" in SOURCES and not set(SOURCES) & set(DATASETS)
    voc = DATASETS["voc12"].archives[0]
    assert voc.filename == "VOCtrainval_11-May-2012.tar" and voc.md5 == "6cd6e144f989b92b3379bac3b3de84fd"
    assert DATASETS["voc12"].archives[1].filename == "SegmentationClassAug.zip"  # query string dropped


def test_resume_after_connection_drop(server, tmp_path):
    data = np.random.default_rng(0).bytes(3_000_000)
    server.files["big.bin"] = data
    server.drop_after["big.bin"] = 1_000_000
    dest = fetch(f"{server.url}/big.bin", tmp_path / "big.bin", backoff=0.01)
    assert dest.read_bytes() == data
    ranges = [r for name, r in server.log if name == "big.bin"]
    assert ranges[0] is None and len(ranges) == 2
    resumed_at = int(ranges[1].removeprefix("bytes=").rstrip("-"))
    assert 900_000 <= resumed_at <= 1_000_000  # resumed, not restarted (one partial chunk may be lost)
    assert not (tmp_path / "big.bin.part").exists()


def test_resume_of_a_partial_file_left_by_an_earlier_run(server, tmp_path):
    data = b"0123456789" * 1000
    server.files["f.bin"] = data
    (tmp_path / "f.bin.part").write_bytes(data[:4000])
    fetch(f"{server.url}/f.bin", tmp_path / "f.bin")
    assert (tmp_path / "f.bin").read_bytes() == data and server.log == [("f.bin", "bytes=4000-")]


def test_a_partial_file_of_a_file_changed_since_is_not_spliced(server, tmp_path):
    """Resumed with If-Range and the version the partial file came from: a file changed on the server since
    comes whole (the tail of the new file was appended to the head of the old one)."""
    old, new = b"o" * 300_000, b"n" * 300_000
    server.files["f.bin"], server.drop_after["f.bin"] = old, 200_000
    with pytest.raises(DownloadError, match="giving up after 1 attempts"):
        fetch(f"{server.url}/f.bin", tmp_path / "f.bin", retries=0)
    assert 0 < (tmp_path / "f.bin.part").stat().st_size < len(old)
    server.files["f.bin"] = new
    assert fetch(f"{server.url}/f.bin", tmp_path / "f.bin").read_bytes() == new
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f.bin"]


def test_transient_errors_retried_then_clear_failure(server, tmp_path):
    server.files["f.bin"] = b"abc"
    server.fail["f.bin"] = 2
    assert fetch(f"{server.url}/f.bin", tmp_path / "f.bin", backoff=0.01).read_bytes() == b"abc"
    server.fail["g.bin"] = 10
    server.files["g.bin"] = b"abc"
    with pytest.raises(DownloadError, match=r"g.bin: giving up after 3 attempts"):
        fetch(f"{server.url}/g.bin", tmp_path / "g.bin", retries=2, backoff=0.01)
    with pytest.raises(DownloadError, match="HTTP 404"):
        fetch(f"{server.url}/missing.bin", tmp_path / "m.bin")


def test_checksum_mismatch_removes_the_file(server, tmp_path):
    server.files["a.zip"] = b"payload"
    archive = Archive("http://example.invalid/a.zip", md5="0" * 32)
    with pytest.raises(DownloadError) as e:
        download(archive, tmp_path, server.url)
    assert f"expected {'0' * 32}, got {md5(b'payload')}" in str(e.value)
    assert list(tmp_path.iterdir()) == []
    # The right checksum passes and the official URL's folder is replaced by the mirror.
    ok = Archive("http://example.invalid/some/dir/a.zip", md5=md5(b"payload"))
    assert download(ok, tmp_path, server.url).read_bytes() == b"payload"


def test_hash_recorded_on_first_download_is_enforced(server, tmp_path):
    server.files["n.zip"] = b"first"
    archive = Archive("http://example.invalid/n.zip")  # nothing published
    download(archive, tmp_path, server.url)
    (tmp_path / "n.zip").unlink()
    server.files["n.zip"] = b"other"
    with pytest.raises(DownloadError, match=r"^n.zip: sha256 mismatch: expected [0-9a-f]{64}, got [0-9a-f]{64}"):
        download(archive, tmp_path, server.url)
    assert not (tmp_path / "n.zip").exists()


def test_a_partial_file_longer_than_the_file_is_downloaded_again(server, tmp_path):
    """A partial file of another, longer version: the server's 416 gives the file's size, which is not the partial
    file's, so the partial file is not the complete download."""
    server.files["f.bin"] = b"abc"
    (tmp_path / "f.bin.part").write_bytes(b"abcdefgh")
    assert fetch(f"{server.url}/f.bin", tmp_path / "f.bin", backoff=0.01).read_bytes() == b"abc"
    assert server.log == [("f.bin", "bytes=8-"), ("f.bin", None)]


def test_an_error_page_served_as_the_archive_is_refused_and_never_recorded(server, tmp_path):
    """A server answering 200 with a web page for a missing archive (nothing published for it): the page must
    not be kept or pinned by recorded.json, or the real archive would be refused as a hash mismatch for good."""
    files = cocostuff10k_archive(2, 1)
    name = "cocostuff-10k-v1.1.zip"
    server.files[name] = b"<!DOCTYPE html>\n<html><body>Sorry, this page does not exist</body></html>"
    cfg = DatasetConfig(name="cocostuff10k", base_url=server.url, n_classes=182, val_split="test")
    with pytest.raises(DownloadError, match=rf"^{name}: not a zip or tar archive but a web page .*\(from http"):
        fetch_dataset(cfg, tmp_path / "raw", tmp_path / "downloads")
    assert list((tmp_path / "downloads").iterdir()) == [] and not (tmp_path / "raw").exists()
    server.files[name] = files[name]
    root = fetch_dataset(cfg, tmp_path / "raw", tmp_path / "downloads")
    assert len(split_items(cfg, root, "train")) == 2


def _damaged_zip():
    data = bytearray(_zip_with("ok/other.txt"))
    at = data.index(b"fine")
    data[at:at + 4] = b"FINE"  # member data no longer matches its CRC; the central directory is intact
    return bytes(data)


@pytest.mark.parametrize("kind", ["crc", "truncated tar", "truncated zip"])
def test_a_damaged_archive_is_refused_before_its_hash_is_recorded(server, tmp_path, kind):
    tar = _tar({"a/b.bin": bytes(5000)})
    data = {"crc": _damaged_zip(), "truncated tar": tar[:2048], "truncated zip": _zip_with("x")[:-30]}[kind]
    server.files["d.zip"] = data
    with pytest.raises(DownloadError, match=r"^d.zip: (damaged archive|neither a zip nor a tar).*\(from http"):
        download(Archive("http://example.invalid/d.zip"), tmp_path, server.url, check=archive_problem)
    assert list(tmp_path.iterdir()) == []


def test_extract_names_a_damaged_archive(tmp_path):
    (tmp_path / "d.zip").write_bytes(_damaged_zip())
    with pytest.raises(DownloadError, match=r"d.zip: damaged archive \(Bad CRC-32.*delete it, and its entry in "
                                            r".*recorded.json"):
        extract(tmp_path / "d.zip", tmp_path / "out")


def test_a_damaged_earlier_download_is_named_with_what_to_do(server, tmp_path):
    server.files["a.bin"] = b"payload"
    archive = Archive("http://example.invalid/a.bin", md5=md5(b"payload"))
    download(archive, tmp_path, server.url)
    (tmp_path / "a.bin").write_bytes(b"paylo")
    with pytest.raises(DownloadError, match=r"a.bin \(downloaded earlier\): md5 mismatch: expected [0-9a-f]{32}, got "
                                            r"[0-9a-f]{32}; delete it to download it again$"):
        download(archive, tmp_path, server.url)
    assert len(server.log) == 1  # nothing fetched again


def _zip_with(name):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        z.writestr("ok/file.txt", "fine")
        z.writestr(name, "evil")
    return buf.getvalue()


@pytest.mark.parametrize("name", ["../escape.txt", "a/../../escape.txt", "/abs/escape.txt"])
def test_extract_refuses_unsafe_zip_members(tmp_path, name):
    (tmp_path / "a.zip").write_bytes(_zip_with(name))
    with pytest.raises(DownloadError, match="refusing"):
        extract(tmp_path / "a.zip", tmp_path / "out")
    assert not (tmp_path / "escape.txt").exists() and not (tmp_path / "out" / "ok").exists()


def test_extract_refuses_tar_links_outside(tmp_path):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as t:
        link = tarfile.TarInfo("data/link")
        link.type, link.linkname = tarfile.SYMTYPE, "../../etc/passwd"
        t.addfile(link)
    (tmp_path / "a.tar").write_bytes(buf.getvalue())
    with pytest.raises(DownloadError, match="refusing link 'data/link'"):
        extract(tmp_path / "a.tar", tmp_path / "out")
    (tmp_path / "b.tar").write_bytes(b"neither")
    with pytest.raises(DownloadError, match="neither a zip nor a tar"):
        extract(tmp_path / "b.tar", tmp_path / "out")


def _cfg(name, server, files, **kw):
    sums = {f: {"md5": md5(data)} for f, data in files.items()}
    return DatasetConfig(name=name, base_url=server.url, checksums=sums, **kw)


def _coco164k(server, files, **kw):
    return _cfg("cocostuff164k", server, files, n_classes=182, train_split="train2017", val_split="val2017", **kw)


def test_voc_download_extract_and_read(server, tmp_path, voc_fixtures):
    files = voc_archives()
    server.files.update(files)
    cfg = _cfg("voc12", server, files, n_classes=21, train_split="train_aug", val_split="val")
    root = fetch_dataset(cfg, tmp_path / "raw", tmp_path / "downloads")
    assert not (root / "VOCdevkit/VOC2012/__MACOSX").exists()
    train = split_items(cfg, root, "train_aug")
    by_id = {it.image_id: it for it in train}
    # The real sample's augmented grayscale label decodes to the same indices as its palette PNG.
    real = read_label(by_id["2007_000032"].label)
    assert set(np.unique(real).tolist()) == {0, 1, 15, 255}
    assert np.array_equal(real, read_label(voc_fixtures / "SegmentationClass" / "2007_000032.png"))
    assert by_id["2007_000032"].label.parent.name == "SegmentationClassAug"
    assert class_names(cfg)[15] == "person"


def test_dataset_root_with_missing_folder_is_named(server, tmp_path):
    files = voc_archives(2, 1)
    server.files.update(files)
    cfg = _cfg("voc12", server, files, n_classes=21, train_split="train_aug", val_split="val")
    root = fetch_dataset(cfg, tmp_path / "raw", tmp_path / "downloads")
    (root / "VOCdevkit/VOC2012/SegmentationClassAug").rename(tmp_path / "moved")
    local = cfg.model_copy(update={"root": str(root), "base_url": None})
    with pytest.raises(DataError, match=r"missing VOCdevkit/VOC2012/SegmentationClassAug \(folder\)"):
        fetch_dataset(local, tmp_path / "raw2")
    assert not (tmp_path / "raw2").exists() and not (tmp_path / ".raw2.partial").exists()
    with pytest.raises(DataError, match=r"dataset.root .*nope: folder not found \(`dvc repro -f download` downloads"):
        check_layout(local, tmp_path / "nope")


def test_failed_download_leaves_no_output(server, tmp_path):
    files = cocostuff10k_archive(2, 1)
    server.files.update(files)
    cfg = DatasetConfig(name="cocostuff10k", base_url=server.url, n_classes=182,
                        checksums={"cocostuff-10k-v1.1.zip": {"md5": "f" * 32}})
    with pytest.raises(DownloadError, match="md5 mismatch"):
        fetch_dataset(cfg, tmp_path / "raw", tmp_path / "downloads")
    assert not (tmp_path / "raw").exists()
    assert [p.name for p in (tmp_path / "downloads").iterdir()] == []


def test_an_archive_of_another_layout_is_named_and_its_files_removed(server, tmp_path):
    """A mirror's archive that holds the dataset under a top-level folder of another name: the error says what
    the archive holds, and the extracted files do not stay beside data/raw (or in an empty dataset.root)."""
    name = "cocostuff-10k-v1.1.zip"
    official = zipfile.ZipFile(io.BytesIO(cocostuff10k_archive(2, 1)[name]))
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for info in official.infolist():
            z.writestr(f"cocostuff-10k/{info.filename}", official.read(info))
    server.files[name] = buf.getvalue()
    cfg = DatasetConfig(name="cocostuff10k", base_url=server.url, n_classes=182, val_split="test")
    for root in (None, tmp_path / "outside"):
        with pytest.raises(DataError, match=rf"^cocostuff10k: the extracted archives \({name}\) lack images "
                                            r"\(folder\).*; their top level holds cocostuff-10k/ \(a mirror"):
            fetch_dataset(cfg.model_copy(update={"root": root and str(root)}), tmp_path / "raw", tmp_path / "dl")
        assert sorted(p.name for p in tmp_path.iterdir()) == ["dl"] + ["outside"] * (root is not None)
        assert root is None or list(root.iterdir()) == []


def test_cocostuff10k_labels(server, tmp_path):
    files = cocostuff10k_archive()
    server.files.update(files)
    cfg = _cfg("cocostuff10k", server, files, n_classes=182, train_split="train", val_split="test", warp_size=33)
    root = fetch_dataset(cfg, tmp_path / "raw", tmp_path / "downloads")
    items = split_items(cfg, root, "train")
    assert len(items) == 6 and items[0].label.suffix == ".mat"
    for dtype in (np.uint8, np.uint16, np.float64):
        (tmp_path / "x.mat").write_bytes(mat_bytes(np.array([[0, 1, 182], [5, 0, 91]], dtype=dtype)))
        assert read_mat_label(tmp_path / "x.mat").tolist() == [[255, 0, 181], [4, 255, 90]]
    (tmp_path / "y.mat").write_bytes(b"not a mat file")
    with pytest.raises(DataError, match="y.mat: cannot read field 'S'"):
        read_mat_label(tmp_path / "y.mat")
    from deeplab.datasets import prepare

    counts = prepare(cfg, root, tmp_path / "prepared", n_jobs=1)
    assert counts == {"train": 6, "test": 3}
    lab = read_label(read_list(tmp_path / "prepared" / "train.txt")[0].label)
    assert lab.shape == (33, 33)
    src = read_mat_label(items[0].label)
    assert set(np.unique(lab).tolist()) <= set(np.unique(src).tolist())


def test_cocostuff10k_warp_follows_warp_size_and_sources(tmp_path):
    """prepare's output persists between DVC runs (dvc.yaml): a rerun for another dataset.warp_size, or after a
    .mat or image was edited, must warp those again, never reuse the earlier warps; the folder then holds what
    a run from scratch makes."""
    from deeplab.datasets import prepare

    root, out = tmp_path / "raw", tmp_path / "prepared"
    zipfile.ZipFile(io.BytesIO(cocostuff10k_archive()["cocostuff-10k-v1.1.zip"])).extractall(root)

    def cfg(size):
        return DatasetConfig(name="cocostuff10k", root=str(root), n_classes=182, train_split="train",
                             val_split="test", warp_size=size)

    def files(folder):
        return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))

    prepare(cfg(49), root, out, n_jobs=1)
    prepare(cfg(33), root, out, n_jobs=1)
    for split in ("train", "test"):
        for it in read_list(out / f"{split}.txt"):
            assert read_image(it.image).shape == (33, 33, 3) and read_label(it.label).shape == (33, 33), it
    prepare(cfg(33), root, tmp_path / "fresh", n_jobs=1)
    assert files(out) == files(tmp_path / "fresh")
    # An edited annotation and an edited image: that pair is warped again from the new files.
    first = read_list(out / "test.txt")[0]
    mat = root / "annotations" / f"{first.image_id}.mat"
    mat.write_bytes(mat_bytes(np.full((48, 64), 7, np.uint16)))  # S 7: class 6 everywhere
    image = root / "images" / f"{first.image_id}.jpg"
    Image.fromarray(np.full((48, 64, 3), 200, np.uint8)).save(image)
    prepare(cfg(33), root, out, n_jobs=1)
    it = read_list(out / "test.txt")[0]
    assert (read_label(it.label) == 6).all()
    assert (np.abs(read_image(it.image).astype(int) - 200) <= 2).all()


def test_cocostuff164k_labels(server, tmp_path):
    files = cocostuff164k_archives()
    server.files.update(files)
    cfg = _coco164k(server, files)
    root = fetch_dataset(cfg, tmp_path / "raw", tmp_path / "downloads")
    val = split_items(cfg, root, "val2017")
    assert [it.image_id for it in val] == sorted(it.image_id for it in val) and len(val) == 3
    assert set(np.unique(read_label(val[0].label)).tolist()) == {0, 181, 255}
    assert class_names(cfg)[181] == "wood"


def test_an_absent_or_empty_dataset_root_is_downloaded_into_and_used_in_place(server, tmp_path):
    """A large dataset can live outside the repository from the start: the download stage fills an empty
    dataset.root (DVC then hashes it in place as prepare's dependency, and never copies it)."""
    files = cocostuff164k_archives(2, 1)
    server.files.update(files)
    (tmp_path / "empty").mkdir()
    for root in (tmp_path / "outside" / "coco", tmp_path / "empty"):
        cfg = _coco164k(server, files, root=str(root))
        raw = tmp_path / f"raw-{root.name}"
        assert fetch_dataset(cfg, raw, tmp_path / "downloads") == raw
        assert [p.name for p in raw.iterdir()] == ["external.json"]  # the repo's folder holds no copy
        assert len(split_items(cfg, root, "val2017")) == 1 and len(split_items(cfg, root, "train2017")) == 2
        assert sorted(p.name for p in root.iterdir()) == ["annotations", "images"]  # no partial folder left


def test_a_dataset_root_holding_files_is_never_downloaded_into(server, tmp_path):
    files = cocostuff164k_archives(2, 1)
    server.files.update(files)
    root = tmp_path / "mine"
    root.mkdir()
    (root / "notes.txt").write_text("mine\n")
    cfg = _coco164k(server, files, root=str(root))
    with pytest.raises(DataError, match=r"cocostuff164k dataset at .*mine is incomplete: missing images \(folder\)"):
        fetch_dataset(cfg, tmp_path / "raw", tmp_path / "downloads")
    assert [p.name for p in root.iterdir()] == ["notes.txt"] and not (tmp_path / "downloads").exists()


def test_a_failed_download_into_an_empty_root_leaves_it_empty(server, tmp_path):
    files = cocostuff164k_archives(2, 1)
    server.files.update(files)
    root = tmp_path / "coco"
    cfg = _coco164k(server, files, root=str(root))
    cfg.checksums["val2017.zip"] = {"md5": "f" * 32}
    with pytest.raises(DownloadError, match="val2017.zip: md5 mismatch"):
        fetch_dataset(cfg, tmp_path / "raw", tmp_path / "downloads")
    assert not (tmp_path / "raw").exists()
    assert not root.exists() or not any(p.name != ".deeplab-partial" for p in root.iterdir())


def test_a_dataset_placed_in_data_raw_survives_dvc_repro(tmp_path):
    """dataset.name custom with dataset.root data/raw and the files copied there: data/raw is the download
    stage's output, which DVC deleted before running the stage, so the stage's refusal came after the dataset
    was gone. data/raw is persistent now: the refusal names what to do and the files are still there."""
    from tests.conftest import NO_TRACKING, make_project, sh, tiny_params

    params = tiny_params()
    params["dataset"].update(name="custom", root="data/raw", n_classes=3,
                             custom={"images": "img/{split}/{id}.png", "labels": "ann/{split}/{id}.png",
                                     "classes": ["a", "b", "c"]})
    root = make_project(tmp_path / "repo", params, mlflow_store=False)
    mine = {}
    for split in ("train", "val"):
        for kind in ("img", "ann"):
            path = root / "data" / "raw" / kind / split / "x.png"
            path.parent.mkdir(parents=True)
            Image.new("L", (8, 8)).save(path)
            mine[path] = path.read_bytes()
    res = sh(root, "dvc", "repro", "download", check=False, env=NO_TRACKING)
    assert res.returncode != 0
    assert all(p.is_file() for p in mine) and {p: p.read_bytes() for p in mine} == mine
    assert ("error: dataset.root: data/raw is the download stage's own folder, which it replaces, and the custom "
            "dataset has nothing to download: set dataset.root to your dataset's folder (what it holds is left as "
            "it is: move it to a folder of its own)") in res.stderr
