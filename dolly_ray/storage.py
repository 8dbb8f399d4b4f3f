"""Where things live: local paths, object-storage URIs and Hugging Face hub ids.

Jobs hand each other paths (a training run's ``hf_model`` becomes the batch job's
``--model``), so one set of rules decides what a string names: a URI (``s3://``,
``gs://``, any scheme pyarrow's filesystems read), a path on this machine, or a hub
id. No Ray import: usable in a notebook.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
import urllib.parse
from pathlib import PurePosixPath

# Record files the readers take, by suffix; a name ending in one is a path, never a hub id.
DATA_FILE_SUFFIXES = (".json", ".jsonl", ".parquet")
MODEL_CACHE = os.path.join("~", ".cache", "dolly_ray", "models")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")


def is_uri(path: str) -> bool:
    """``scheme://...``: object storage or another filesystem pyarrow reads."""
    return "://" in path


def is_local_path(path: str) -> bool:
    """A path on this machine: it exists, or it is spelled like one (absolute, ``./``,
    ``~``, or ending in a record-file suffix), so a missing one is reported as missing
    rather than looked up on the hub."""
    return not is_uri(path) and (
        os.path.exists(path) or path.startswith(("/", ".", "~")) or PurePosixPath(path).suffix.lower() in DATA_FILE_SUFFIXES
    )


def is_hub_id(name: str) -> bool:
    """``owner/name`` or ``name`` that is neither a URI nor a local path: a Hugging Face hub id."""
    return not is_uri(name) and not is_local_path(name)


def missing_local(path: str) -> bool:
    """A local path (as ``is_local_path`` reads it) that is not there: the jobs refuse it
    before Ray starts. URIs and hub ids are checked where they are read."""
    return is_local_path(path) and not os.path.exists(os.path.expanduser(path))


def absolute(path: str) -> str:
    """A URI unchanged; a local path made absolute (``~`` expanded), so workers on any node
    and later jobs read the same place."""
    return path if is_uri(path) else os.path.abspath(os.path.expanduser(path))


def uri_in(fs_path: str, like: str) -> str:
    """A path inside the filesystem of ``like``, as Ray Train and pyarrow report it (the
    scheme stripped: ``bucket/runs/x``), written as a location any job takes back: a URI
    with ``like``'s scheme and query (``s3://bucket/runs/x``) when ``like`` is one."""
    if not is_uri(like):
        return fs_path
    parts = urllib.parse.urlsplit(like)
    return f"{parts.scheme}://{fs_path}" + (f"?{parts.query}" if parts.query else "")


def join(location: str, *names: str) -> str:
    """``location/name/...`` for a local path or a URI (keeping a URI's query last)."""
    if not is_uri(location):
        return os.path.join(location, *names)
    parts = urllib.parse.urlsplit(location)
    path = "/".join([parts.path.rstrip("/"), *names])
    return urllib.parse.urlunsplit(parts._replace(path=path))


def upload_dir(local_dir: str, location: str) -> None:
    """Copy a local directory's files to ``location`` (a URI or local path), overwriting."""
    from pyarrow import fs

    filesystem, where = fs.FileSystem.from_uri(absolute(location))
    filesystem.create_dir(where, recursive=True)
    fs.copy_files(local_dir, where, destination_filesystem=filesystem)


def read_text(location: str) -> str:
    """A text file's contents, from a local path or a URI."""
    from pyarrow import fs

    filesystem, where = fs.FileSystem.from_uri(absolute(location))
    with filesystem.open_input_stream(where) as stream:
        return stream.read().decode()


def input_filesystem(path: str):
    """``(pyarrow filesystem, path inside it)`` for a file about to be read."""
    from pyarrow import fs

    return fs.FileSystem.from_uri(absolute(path))


def output_filesystem(path: str):
    """``(pyarrow filesystem, path inside it)`` for a file about to be written, its parent
    directory created."""
    from pyarrow import fs

    filesystem, where = fs.FileSystem.from_uri(absolute(path))
    parent = PurePosixPath(where).parent
    if str(parent) not in ("", "."):
        filesystem.create_dir(str(parent), recursive=True)
    return filesystem, where


def local_model_dir(name_or_path: str, *, weights: bool = True) -> str:
    """A model at a URI (as training writes with such a ``--storage-path``) copied once
    into a local cache; hub ids and local paths come back unchanged. ``weights=False``
    copies only the small files (config, tokenizer), enough for a driver to check it.

    transformers only reads local directories and the hub; this lets Serve replicas and
    batch actors on any node load the checkpoint a training run reported.
    """
    if not is_uri(name_or_path):
        return name_or_path
    import pyarrow.fs

    key = hashlib.sha256(name_or_path.encode()).hexdigest()[:16] + ("" if weights else "-config")
    target = os.path.join(os.path.expanduser(MODEL_CACHE), key)
    if os.path.isdir(target):
        return target
    os.makedirs(os.path.dirname(target), exist_ok=True)
    staging = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=".fetching-")
    try:
        filesystem, root = pyarrow.fs.FileSystem.from_uri(name_or_path)
        for info in filesystem.get_file_info(pyarrow.fs.FileSelector(root, recursive=True)):
            if info.type != pyarrow.fs.FileType.File or (not weights and info.path.endswith(WEIGHT_SUFFIXES)):
                continue
            destination = os.path.join(staging, os.path.relpath(info.path, root))
            os.makedirs(os.path.dirname(destination), exist_ok=True)
            pyarrow.fs.copy_files(info.path, destination, source_filesystem=filesystem)
        os.rename(staging, target)  # atomic: a half-copied model is never used
    except FileNotFoundError:
        raise FileNotFoundError(f"model not found: {name_or_path}") from None
    except OSError:
        if not os.path.isdir(target):  # not merely another process finishing first
            raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def fingerprint(location: str, *, contents: bool = True) -> str:
    """What identifies the data at ``location`` (a file or a directory): for local files
    their names, sizes and a hash of their bytes; in object storage (and locally with
    ``contents=False``, for a model's gigabytes of weights) their names, sizes and
    modification times, as a listing gives them; a hub id stands for itself (its
    revision cannot be asked for offline)."""
    if is_hub_id(location):
        return f"hub:{location}"
    from pyarrow import fs

    filesystem, root = fs.FileSystem.from_uri(absolute(location))
    info = filesystem.get_file_info(root)
    files = [info] if info.type == fs.FileType.File else filesystem.get_file_info(fs.FileSelector(root, recursive=True))
    digest = hashlib.sha256()
    for file in sorted((f for f in files if f.type == fs.FileType.File), key=lambda f: f.path):
        digest.update(f"{os.path.relpath(file.path, root)}\0{file.size}\0".encode())
        if is_uri(location) or not contents:
            digest.update(str(file.mtime_ns).encode())
            continue
        with filesystem.open_input_stream(file.path) as stream:
            while chunk := stream.read(1 << 24):
                digest.update(chunk)
    return digest.hexdigest()[:16]


def is_file(location: str) -> bool:
    from pyarrow import fs

    filesystem, where = fs.FileSystem.from_uri(absolute(location))
    return filesystem.get_file_info(where).type == fs.FileType.File


def subdirs(location: str) -> list[str]:
    """Names of the directories directly in ``location`` (none when it is not there)."""
    from pyarrow import fs

    filesystem, where = fs.FileSystem.from_uri(absolute(location))
    listing = filesystem.get_file_info(fs.FileSelector(where, allow_not_found=True))
    return sorted(PurePosixPath(info.path).name for info in listing if info.type == fs.FileType.Directory)


def delete_dir(location: str) -> None:
    """Remove a directory and everything in it, local or in object storage (nothing when it is not there)."""
    from pyarrow import fs

    filesystem, where = fs.FileSystem.from_uri(absolute(location))
    if filesystem.get_file_info(where).type == fs.FileType.Directory:
        filesystem.delete_dir(where)
