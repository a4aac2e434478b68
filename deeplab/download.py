"""Downloads and extraction, shared by the dataset and the caffemodel stages.

Each dataset's archives (URL and known checksums) are in its entry of ``deeplab.datasets.DATASETS``; the
other downloads are in ``SOURCES``. ``fetch`` resumes an interrupted
download with an HTTP Range request, retries transient failures with backoff, shows size and speed, and
moves the file into place only after it is verified. Where no checksum is published, the size and SHA-256
seen on the first download are recorded (``recorded.json`` beside the archives), once the file has read back
as a whole archive (not an error page a server answered with), and later downloads must match them.
``extract`` refuses members that would land outside the target.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tarfile
import time
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from tqdm import tqdm

from deeplab.config import DatasetConfig
from deeplab.files import file_hash, write_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Archive:
    url: str
    # Folder (relative to the dataset root) the archive is extracted into.
    into: str = "."
    md5: str | None = None
    sha1: str | None = None
    size: int | None = None

    @property
    def filename(self) -> str:
        return self.url.split("?")[0].rstrip("/").split("/")[-1]


# Downloads other than datasets (whose archives are in deeplab.datasets.DATASETS).
SOURCES: dict[str, list[Archive]] = {
    "caffemodel": [
        Archive("http://liangchiehchen.com/projects/released/deeplab_aspp_resnet101/prototxt_and_model.zip"),
    ],
}


class DownloadError(RuntimeError):
    """A download failed for good, or its file did not verify; the message names URL or file."""


def published(archive: Archive) -> dict[str, object]:
    return {k: v for k, v in (("size", archive.size), ("md5", archive.md5), ("sha1", archive.sha1)) if v is not None}


def verify(path: Path, expected: dict[str, object], name: str, after: str) -> dict[str, object]:
    """Check ``path`` against every expected value (size, md5, sha1, sha256); raise naming ``name``, with expected
    and actual values on a mismatch, then ``after`` (where the file came from, or what to do). Returns what was
    measured (size, sha256), to record where nothing was published."""
    seen: dict[str, object] = {"size": path.stat().st_size, "sha256": file_hash(path, "sha256")}
    for key, want in expected.items():
        got = seen[key] if key in seen else file_hash(path, key)
        if got != want:
            raise DownloadError(f"{name}: {key} mismatch: expected {want}, got {got}{after}")
    return seen


def fetch(url: str, dest: Path, retries: int = 5, backoff: float = 1.0, timeout: float = 60.0,
          desc: str | None = None) -> Path:
    """Download ``url`` to ``dest`` through ``dest.part``, resuming a partial file with HTTP Range (and If-Range,
    where the server named the version it sent, so that a file changed since gives the whole new file instead of
    its tail appended to the old file's head)."""
    import requests  # here: the synthetic default and local datasets never download

    part = dest.with_name(dest.name + ".part")
    version = dest.with_name(dest.name + ".part.version")  # the ETag or Last-Modified of the partial file's bytes
    dest.parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(retries + 1):
        have = part.stat().st_size if part.exists() else 0
        headers = {"Range": f"bytes={have}-"} if have else {}
        if have and version.exists():
            headers["If-Range"] = version.read_text()
        try:
            with requests.get(url, headers=headers, stream=True, timeout=timeout) as r:
                if r.status_code == 416:  # nothing at or after byte `have`: complete, unless the file is shorter
                    size = r.headers.get("Content-Range", "").rpartition("/")[2]
                    if size.isdigit() and int(size) != have:  # the partial file is of another, longer version
                        part.unlink()
                        raise requests.ConnectionError(f"{part.name} held {have} bytes, the file {size}: removed")
                    break
                if r.status_code >= 500 or r.status_code == 429:
                    raise requests.ConnectionError(f"HTTP {r.status_code}")
                if r.status_code not in (200, 206):
                    raise DownloadError(f"{url}: HTTP {r.status_code} {r.reason}")
                if have and r.status_code == 200:  # the server ignored Range, or the file changed: start over
                    have = 0
                if not have:
                    etag = r.headers.get("ETag", "")
                    tag = r.headers.get("Last-Modified", "") if etag.startswith("W/") or not etag else etag
                    if tag:
                        version.write_text(tag)
                    else:
                        version.unlink(missing_ok=True)
                total = int(r.headers.get("Content-Length", 0)) + have or None
                with open(part, "ab" if have else "wb") as f, tqdm(
                        total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                        desc=desc or dest.name, mininterval=1.0) as bar:
                    # Small chunks: a dropped connection loses at most one unfinished chunk.
                    for chunk in r.iter_content(chunk_size=1 << 16):
                        f.write(chunk)
                        bar.update(len(chunk))
                if total is not None and part.stat().st_size < total:
                    raise requests.ConnectionError(f"connection closed at {part.stat().st_size} of {total} bytes")
            break
        except (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError) as e:
            if attempt == retries:
                raise DownloadError(f"{url}: giving up after {retries + 1} attempts: {e}") from None
            wait = backoff * 2**attempt
            log.warning("%s: %s; retrying in %.0f s (attempt %d of %d)", url, e, wait, attempt + 2, retries + 1)
            time.sleep(wait)
    os.replace(part, dest)
    version.unlink(missing_ok=True)
    return dest


def download(archive: Archive, downloads: Path, base_url: str | None = None,
             checksums: dict[str, object] | None = None,
             check: Callable[[Path], str | None] | None = None) -> Path:
    """The verified archive in ``downloads``, fetched if absent. ``checksums`` replace the published values
    (a mirror's own archive). ``check`` says what is wrong with a fetched file (e.g. ``archive_problem``), or
    None; it runs where nothing is published or recorded, before the file is kept and its size and hash
    recorded, so an error page a server answered with is never pinned as the file. A file that fails
    verification or the check is removed."""
    url = f"{base_url.rstrip('/')}/{archive.filename}" if base_url else archive.url
    dest = downloads / archive.filename
    record_file = downloads / "recorded.json"
    recorded = json.loads(record_file.read_text()) if record_file.exists() else {}
    expected = dict(checksums) if checksums else published(archive)
    expected = expected or recorded.get(archive.filename, {})
    if not dest.exists():
        # Verify under the temporary name, so a bad file never appears under the real one.
        tmp = fetch(url, dest.with_name(dest.name + ".unverified"), desc=archive.filename)
        try:
            seen = verify(tmp, expected, archive.filename, f" (from {url})")
            # Only a file whose values are about to be recorded needs reading back: a published or recorded
            # checksum that matched already says it is the file (and COCO's 18 GB zip is not read twice).
            problem = check(tmp) if check is not None and not expected else None
            if problem:
                raise DownloadError(f"{archive.filename}: {problem} (from {url})")
        except DownloadError:
            tmp.unlink()
            raise
        os.replace(tmp, dest)
    else:
        # A file damaged on disk, or replaced by hand, stays (it may be the user's): the error says what to do.
        seen = verify(dest, expected, f"{dest} (downloaded earlier)", "; delete it to download it again")
    if archive.filename not in recorded:
        recorded[archive.filename] = seen
        write_json(record_file, recorded)
    return dest


def archive_problem(path: Path) -> str | None:
    """What keeps ``path`` from extracting (not a zip or tar, truncated, a member failing its CRC), or None. Reads
    the whole archive once (on a fresh download, next to the network's time)."""
    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                bad = z.testzip()
            return f"damaged archive (member {bad!r} fails its CRC)" if bad else None
        if tarfile.is_tarfile(path):
            with tarfile.open(path) as t:
                for m in t:
                    f = t.extractfile(m) if m.isfile() else None
                    while f is not None and f.read(1 << 20):
                        pass
            return None
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error, OSError) as e:
        return f"damaged archive ({e})"
    return _web_page(path, "a zip or tar archive") or "neither a zip nor a tar archive"


def _web_page(path: Path, expected: str) -> str | None:
    """The problem of a file that is a web page (what a server answers with for a missing file or a sign-in),
    or None."""
    with open(path, "rb") as f:
        head = f.read(256).lstrip().lower()
    if head.startswith((b"<!doctype html", b"<html", b"<?xml", b"<head")):
        return (f"not {expected} but a web page (the server answered with an error or sign-in page instead of "
                f"the file)")
    return None


def weights_problem(path: Path) -> str | None:
    """What keeps ``path`` from being a file ``torch.save`` wrote (a zip since PyTorch 1.6, a pickle before:
    the releases are of 2019), or None. Reads its first bytes only."""
    with open(path, "rb") as f:
        head = f.read(4)
    if zipfile.is_zipfile(path) or head[:1] == b"\x80":  # pickle protocol 2+: legacy torch.save
        return None
    return _web_page(path, "PyTorch weights") or f"not PyTorch weights (neither a zip nor a pickle: starts {head!r})"


def _check_member(name: str, target: Path, archive: Path) -> None:
    p = PurePosixPath(name)
    if p.is_absolute() or name.startswith(("/", "\\")) or ".." in p.parts or (p.parts and ":" in p.parts[0]):
        raise DownloadError(f"{archive}: refusing unsafe member {name!r} (absolute path or '..')")
    if not (target / name).resolve().is_relative_to(target.resolve()):
        raise DownloadError(f"{archive}: refusing member {name!r}: it would land outside {target}")


def extract(archive: Path, target: Path) -> None:
    """Extract a zip or tar archive into ``target``, refusing absolute paths, '..' and escaping links."""
    target.mkdir(parents=True, exist_ok=True)
    try:
        _extract(archive, target)
    except (zipfile.BadZipFile, tarfile.TarError, EOFError, zlib.error) as e:
        raise DownloadError(f"{archive}: damaged archive ({e}); delete it, and its entry in "
                            f"{archive.parent / 'recorded.json'} if it has one, to download it again") from None


def _extract(archive: Path, target: Path) -> None:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                _check_member(info.filename, target, archive)
                if (info.external_attr >> 16) & 0o170000 == 0o120000:
                    raise DownloadError(f"{archive}: refusing symbolic link member {info.filename!r}")
            z.extractall(target)
    elif tarfile.is_tarfile(archive):
        with tarfile.open(archive) as t:
            members = t.getmembers()
            for m in members:
                _check_member(m.name, target, archive)
                if m.issym() or m.islnk():
                    link = (target / m.name).parent / m.linkname if m.issym() else target / m.linkname
                    if os.path.isabs(m.linkname) or not link.resolve().is_relative_to(target.resolve()):
                        raise DownloadError(f"{archive}: refusing link {m.name!r} -> {m.linkname!r} outside {target}")
            # The 'data' filter enforces the same rules again and drops device files and odd permissions.
            t.extractall(target, members=members, filter="data")
    else:
        raise DownloadError(f"{archive}: neither a zip nor a tar archive")


def fetch_dataset(cfg: DatasetConfig, out: Path, downloads: Path = Path("data/downloads")) -> Path:
    """Produce the dataset under ``out``: generated (synthetic), checked in place (``dataset.root`` set), or
    downloaded, verified and extracted. A ``dataset.root`` folder that is absent or empty is first downloaded
    into (a built-in dataset), so a large dataset can live outside the repository from the start. Work happens
    in a temporary folder that replaces the target only when complete, so an interrupted or failed stage never
    leaves a half-made dataset."""
    from deeplab.datasets import DATASETS, check_layout, class_names

    ds = DATASETS[cfg.name]
    class_names(cfg)  # a custom dataset's class file that does not fit fails here, before anything is made
    tmp = out.with_name(f".{out.name}.partial")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        if ds.generate is not None:
            ds.generate(cfg, tmp)
        elif cfg.root and Path(cfg.root).resolve() != out.resolve():  # root data/raw: the download's own folder
            root = Path(cfg.root)
            if ds.archives and not _holds_anything(root):
                log.info("dataset.root %s is empty: downloading the %s dataset into it", root, cfg.name)
                _download_into(cfg, root, downloads)
            check_layout(cfg, root)
            tmp.mkdir(parents=True)
            write_json(tmp / "external.json", {"dataset": cfg.name, "root": str(root.resolve())})
            log.info("using the %s dataset at %s", cfg.name, root)
        elif not ds.archives:
            # data/raw is persistent in dvc.yaml, so files placed there are still there to move.
            held = " (what it holds is left as it is: move it to a folder of its own)" if _holds_anything(out) else ""
            raise DownloadError(f"dataset.root: {cfg.root} is the download stage's own folder, which it replaces, "
                                f"and the {cfg.name} dataset has nothing to download: set dataset.root to your "
                                f"dataset's folder{held}")
        else:
            shutil.rmtree(out, ignore_errors=True)  # as DVC did before data/raw was persistent: disk for one copy
            _download_into(cfg, tmp, downloads)
    except BaseException:  # a failed download or extraction leaves no dataset files beside ``out``
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    log.info("dataset %s ready in %s", cfg.name, out)
    return out


_PARTIAL = ".deeplab-partial"  # the folder a dataset is extracted into, inside its target, until complete


def _holds_anything(folder: Path) -> bool:
    return folder.is_dir() and any(p.name != _PARTIAL for p in folder.iterdir())


def _download_into(cfg: DatasetConfig, target: Path, downloads: Path) -> None:
    """Download, verify and extract the archives of ``cfg``'s dataset into ``target`` (absent or empty): in
    ``target/.deeplab-partial`` first, whose entries move into ``target`` once the layout checks out (a rename
    on one filesystem, and ``target`` may be a mount point)."""
    from deeplab.data import DataError
    from deeplab.datasets import DATASETS, finish_layout, layout_missing

    tmp = target / _PARTIAL
    shutil.rmtree(tmp, ignore_errors=True)
    archives = DATASETS[cfg.name].archives
    try:
        for archive in archives:
            path = download(archive, downloads, cfg.base_url, cfg.checksums.get(archive.filename), archive_problem)
            log.info("extracting %s", path.name)
            extract(path, tmp / archive.into)
        finish_layout(cfg, tmp)
        missing = layout_missing(cfg, tmp)
        if missing:  # e.g. a mirror's archive that holds the layout under a folder of another name
            held = ", ".join(sorted(p.name + "/" * p.is_dir() for p in tmp.iterdir())) or "nothing"
            mirror = " (a mirror's archives must unpack as the official ones)" if cfg.base_url else ""
            raise DataError(f"{cfg.name}: the extracted archives ({', '.join(a.filename for a in archives)}) "
                            f"lack {missing}; their top level holds {held}{mirror}")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for entry in tmp.iterdir():
        entry.rename(target / entry.name)
    tmp.rmdir()


def fetch_caffemodel(downloads: Path, name: str = "init.caffemodel", base_url: str | None = None,
                     checksums: dict[str, object] | None = None) -> Path:
    """DeepLab v2's ``name`` from the authors' prototxt_and_model.zip (downloaded, verified, extracted once)."""
    archive = SOURCES["caffemodel"][0]
    zip_path = download(archive, downloads, base_url, checksums, archive_problem)
    target = downloads / zip_path.stem
    found = sorted(target.rglob(name)) if target.is_dir() else []
    if not found:
        tmp = downloads / f".{zip_path.stem}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        extract(zip_path, tmp)
        shutil.rmtree(target, ignore_errors=True)
        tmp.rename(target)
        found = sorted(target.rglob(name))
    if not found:
        raise DownloadError(f"{zip_path}: no {name} inside")
    return found[0]


# The reference's released PyTorch weights (kazuto1011/deeplab-pytorch, GitHub release v1.0), by init.name: plain
# state dicts of DeepLab v2 ResNet-101 in MSC (keys base.*). No checksum is published: size and SHA-256 are
# recorded on the first download like the other unpublished files.
RELEASE_URL = "https://github.com/kazuto1011/deeplab-pytorch/releases/download/v1.0"
RELEASED: dict[str, tuple[Archive, int]] = {
    "cocostuff10k": (Archive(f"{RELEASE_URL}/deeplabv2_resnet101_msc-cocostuff10k-20000.pth"), 182),
    "cocostuff164k": (Archive(f"{RELEASE_URL}/deeplabv2_resnet101_msc-cocostuff164k-100000.pth"), 182),
    "voc12": (Archive(f"{RELEASE_URL}/deeplabv2_resnet101_msc-vocaug-20000.pth"), 21),
}


def fetch_released(name: str, downloads: Path, base_url: str | None = None,
                   checksums: dict[str, object] | None = None) -> Path:
    """The reference's released weights ``name`` (a key of ``RELEASED``) in ``downloads``, fetched and verified
    through ``download``: with nothing published, the first download must be PyTorch weights before its size and
    sha256 are recorded (``weights_problem``)."""
    if name not in RELEASED:
        raise DownloadError(f"no released weights named {name!r} (known: {', '.join(RELEASED)})")
    return download(RELEASED[name][0], downloads, base_url, checksums, check=weights_problem)
