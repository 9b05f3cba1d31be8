"""Moving results folders between tiers safely: copy every finished folder, verify each
copy against its manifest (size and SHA-256), then delete only what was copied.

A folder without its manifest is still being written and is left alone; files a
crashed writer left (``.tmp-`` names) are never copied, and are deleted with the rest.
"""

from __future__ import annotations

from collections.abc import Callable

from pipeline.storage.objects import (
    MANIFEST_NAMES,
    copy_file,
    filesystem,
    list_files,
    read_manifest,
    remove_tree,
    sha256_of,
)
from schemas.errors import StoreError

__all__ = ["copy_verified", "delete_copied", "expected_checksums", "finished_folders", "is_temporary"]


def expected_checksums(url: str, files: list[str]) -> dict[str, tuple[int, str]]:
    """name relative to ``url`` -> (bytes, sha256) from every manifest under ``url``."""
    expected: dict[str, tuple[int, str]] = {}
    folders = {rel.rpartition("/")[0] for rel in files if rel.rpartition("/")[2] in MANIFEST_NAMES}
    for folder in sorted(folders):
        manifest = read_manifest(f"{url}/{folder}" if folder else url)
        try:
            for entry in manifest["files"]:
                name = f"{folder}/{entry['name']}" if folder else entry["name"]
                expected[name] = (int(entry["bytes"]), str(entry["sha256"]))
        except (KeyError, TypeError, ValueError) as exc:
            raise StoreError(f"the manifest in {url}/{folder} lacks {exc}; not moved") from exc
    return expected


def is_temporary(rel: str) -> bool:
    """A half-written file a crashed writer left (``storage`` writes via ``.tmp-`` names)."""
    return rel.rpartition("/")[2].startswith(".tmp-")


def finished_folders(listing: dict[str, int]) -> dict[str, int]:
    """The files of results folders whose manifest is written: a folder without one is
    still being written (a finalizer or a retry merge at work) and is left alone."""
    finished = {rel.rpartition("/")[0] for rel in listing if rel.rpartition("/")[2] in MANIFEST_NAMES}
    return {rel: size for rel, size in listing.items() if rel.rpartition("/")[0] in finished}


def copy_verified(source: str, target: str, storage_class: str, heartbeat: Callable[[], None]) -> dict[str, int]:
    """Copy every file of every finished results folder under ``source`` to ``target`` and
    verify each copy; {path: bytes} copied."""
    listing = finished_folders({rel: size for rel, size in list_files(source) if not is_temporary(rel)})
    expected = expected_checksums(source, list(listing))
    for rel in listing:
        heartbeat()
        src, dst = f"{source}/{rel}", f"{target}/{rel}"
        want = expected.get(rel)
        copied, read_digest = copy_file(src, dst, storage_class)
        if want is not None and read_digest is not None and (copied, read_digest) != want:
            raise StoreError(
                f"{src} does not match its manifest ({copied} bytes, sha256 {read_digest[:12]}...; "
                f"manifest: {want[0]} bytes, sha256 {want[1][:12]}...); not moved"
            )
        if want is None:  # a file no manifest lists: the source is the reference
            want = (copied, read_digest or sha256_of(src))
        fs, path = filesystem(dst)
        fs.invalidate_cache()
        if (int(fs.size(path)), sha256_of(dst)) != want:
            what = "its manifest" if rel in expected else src
            raise StoreError(f"the copy {dst} does not match {what} (source {src}); not moved")
    return listing


def delete_copied(source: str, copied: dict[str, int]) -> None:
    """Delete each file under ``source`` that was copied (same path and size), then
    the folder if nothing is left: a file written after the copy (a retry's new
    result version) stays, and the next sweep moves it."""
    fs, root = filesystem(source)
    kept: set[str] = set()
    emptied: set[str] = set()
    paths: list[str] = []
    for rel, size in list_files(source):
        folder = rel.rpartition("/")[0]
        if is_temporary(rel) or copied.get(rel) == size:
            paths.append(f"{root.rstrip('/')}/{rel}")
            emptied.add(folder)
        else:
            kept.add(folder)
    if not kept:
        remove_tree(source)
        return
    if paths:
        fs.rm(paths)  # one bulk request on S3
    for folder in emptied - kept:  # a folder whose files all moved (no nesting under results folders)
        if folder:
            remove_tree(f"{source}/{folder}")
