"""Run-directory I/O on local disk, NFS or object storage (s3://, gs://) through pyarrow.fs.

Ray Train writes its checkpoints under `storage_path/run_name`; our own outputs (metrics.jsonl, config.yaml,
labels.json, errors.parquet, inference/, plots) sit beside them, so one place holds a whole run.
Local writes go to a temporary file renamed into place: a reader never sees half a file.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path


def is_remote(uri: str) -> bool:
    return "://" in uri and not uri.startswith("file://")


def storage_uri(path: str) -> str:
    """Absolute local path (Ray needs one) or the URI as given."""
    if is_remote(path):
        return path.rstrip("/")
    return str(Path(path.removeprefix("file://")).expanduser().resolve())


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *(p.strip("/") for p in parts)])


def _fs(uri: str):
    import pyarrow.fs as pafs

    return pafs.FileSystem.from_uri(uri)  # (filesystem, path inside it)


def makedirs(uri: str) -> None:
    if is_remote(uri):
        fs, path = _fs(uri)
        fs.create_dir(path, recursive=True)
    else:
        Path(uri).mkdir(parents=True, exist_ok=True)


def write_bytes(uri: str, data: bytes) -> None:
    if is_remote(uri):
        fs, path = _fs(uri)
        with fs.open_output_stream(path) as f:  # object stores publish on close: atomic for readers
            f.write(data)
        return
    target = Path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
    with os.fdopen(fd, "wb") as f:
        f.write(data)
    os.replace(tmp, target)


def write_text(uri: str, text: str) -> None:
    write_bytes(uri, text.encode())


def read_text(uri: str) -> str:
    if is_remote(uri):
        fs, path = _fs(uri)
        with fs.open_input_stream(path) as f:
            return f.read().decode()
    return Path(uri).read_text()


def exists(uri: str) -> bool:
    if is_remote(uri):
        import pyarrow.fs as pafs

        fs, path = _fs(uri)
        return fs.get_file_info(path).type != pafs.FileType.NotFound
    return Path(uri).exists()


def upload_dir(local_dir: str | os.PathLike, uri: str) -> None:
    """Copies a local directory to `uri`, replacing what was there (atomically on local disk)."""
    if is_remote(uri):
        import pyarrow.fs as pafs

        fs, path = _fs(uri)
        pafs.copy_files(str(local_dir), path, destination_filesystem=fs)
        return
    import shutil

    target = Path(uri)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    shutil.copytree(local_dir, tmp, dirs_exist_ok=True)
    old = target.with_name(f".{target.name}.old")
    if target.exists():
        shutil.rmtree(old, ignore_errors=True)
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def local_copy_for_write(uri: str) -> Iterator[str]:
    """Yields a local path to write a file to (e.g. a matplotlib figure); it is then put at `uri`."""
    suffix = Path(uri).suffix
    with tempfile.TemporaryDirectory() as d:
        local = str(Path(d) / f"out{suffix}")
        yield local
        write_bytes(uri, Path(local).read_bytes())
