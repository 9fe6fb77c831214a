"""File I/O for adapter directories: reading untrusted files, writing atomically.

Reading (`read_regular_file`, `parse_json`, `read_json_file`): only regular files are read
(a directory, /dev/zero, a FIFO or a socket is refused with a ValueError instead of reading
forever or reporting "missing"); symlinks are followed (the Hugging Face cache links files to
blobs). JSON is parsed strictly: at most MAX_JSON_BYTES, nesting at most MAX_JSON_DEPTH deep
(deeper input gives a ValueError, never a RecursionError), no duplicate keys (the first of two
"r" keys must not be silently ignored), and any parse failure (including integers of more than
4300 digits) is a ValueError naming the file.

Writing (`write_files_atomically`): every file is first written in full to a fresh temporary
name in the target directory (created with O_EXCL, so a symlink planted there is never
followed), flushed and fsync'ed; then the temporary files are renamed over the final names in
the order given. rename() replaces a symlink at the final name by the new file, it never writes
through it. A failure while writing (disk full, serialisation error) leaves every old file as it
was; a failure between two renames restores the files already renamed from hard-link backups;
only a crash between two renames can leave new and old files side by side, which readers detect
(checkpoint.py records the weights' SHA-256 in the config, which is renamed last).
"""
from __future__ import annotations

import json
import os
import stat
import tempfile
import uuid
from typing import Any, Dict, List, Optional, Sequence, Tuple

MAX_JSON_BYTES = 16 << 20
MAX_JSON_DEPTH = 32


def read_regular_file(path: str, what: str = "file", max_bytes: Optional[int] = None) -> bytes:
    """The bytes of the regular file at `path` (symlinks followed).

    FileNotFoundError if nothing is there (or a dangling symlink); ValueError if it is a
    directory, not a regular file, unreadable, or larger than max_bytes."""
    flags = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)  # O_NONBLOCK: a FIFO must not block open()
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FileNotFoundError(f"MiLoRA: {path} is missing") from None
    except IsADirectoryError:
        raise ValueError(f"MiLoRA: {what} {path} is a directory, expected a regular file") from None
    except OSError as e:
        raise ValueError(f"MiLoRA: cannot open {what} {path}: {e.strerror or e}") from None
    try:
        st = os.fstat(fd)
        if stat.S_ISDIR(st.st_mode):
            raise ValueError(f"MiLoRA: {what} {path} is a directory, expected a regular file")
        if not stat.S_ISREG(st.st_mode):
            raise ValueError(f"MiLoRA: {what} {path} is not a regular file (a device, FIFO or socket)")
        if max_bytes is not None and st.st_size > max_bytes:
            raise ValueError(f"MiLoRA: {what} {path} is {st.st_size} bytes, more than the {max_bytes} allowed")
        os.set_blocking(fd, True)
        chunks: List[bytes] = []
        total = 0
        with os.fdopen(fd, "rb", closefd=False) as f:
            while True:
                chunk = f.read(1 << 24)
                if not chunk:
                    break
                total += len(chunk)
                if max_bytes is not None and total > max_bytes:
                    raise ValueError(f"MiLoRA: {what} {path} is more than the {max_bytes} bytes allowed")
                chunks.append(chunk)
        return b"".join(chunks)
    except OSError as e:
        raise ValueError(f"MiLoRA: cannot read {what} {path}: {e.strerror or e}") from None
    finally:
        os.close(fd)


def _no_duplicate_keys(pairs: List[Tuple[str, Any]]) -> Dict[str, Any]:
    out: Dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"duplicate key {k[:60]!r}")
        out[k] = v
    return out


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest = 0
    stack = [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict):
            v = list(v.values())
        if isinstance(v, list):
            deepest = max(deepest, d)
            if d > MAX_JSON_DEPTH:
                return d
            stack.extend((x, d + 1) for x in v)
    return deepest


def parse_json(text, source: str) -> Any:
    """Parse JSON text strictly (see the module docstring); ValueError naming `source`."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        doc = json.loads(text, object_pairs_hook=_no_duplicate_keys)
    except RecursionError:
        raise ValueError(f"MiLoRA: {source} is not valid JSON (nested too deeply)") from None
    except (ValueError, UnicodeDecodeError) as e:  # JSONDecodeError, duplicate keys, huge integers
        raise ValueError(f"MiLoRA: {source} is not valid JSON ({str(e)[:200]})") from None
    if _depth(doc) > MAX_JSON_DEPTH:
        raise ValueError(f"MiLoRA: {source} is nested more than {MAX_JSON_DEPTH} levels deep")
    return doc


def read_json_file(path: str) -> Dict[str, Any]:
    """Read a JSON file that must hold an object."""
    doc = parse_json(read_regular_file(path, "JSON file", MAX_JSON_BYTES), path)
    if not isinstance(doc, dict):
        raise ValueError(f"MiLoRA: {path} must hold a JSON object, got {type(doc).__name__}")
    return doc


def _fsync_dir(directory: str) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def _remove(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


def write_files_atomically(directory: str, files: Sequence[Tuple[str, bytes]]) -> None:
    """Write files[i] = (name, data) into `directory`, all or nothing (see the module docstring).

    The files are renamed into place in the given order (put the one that commits the
    checkpoint, e.g. the config naming the weights' hash, last)."""
    mode = _file_mode()
    temps: List[str] = []
    try:
        for name, data in files:
            fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".tmp", dir=directory)
            temps.append(tmp)
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fchmod(f.fileno(), mode)
                os.fsync(f.fileno())
    except BaseException:
        for tmp in temps:
            _remove(tmp)
        raise
    done: List[Tuple[str, Optional[str]]] = []  # (final path, backup of the old file or None)
    try:
        for (name, _), tmp in zip(files, temps):
            final = os.path.join(directory, name)
            backup = None
            if os.path.lexists(final):
                backup = os.path.join(directory, f".{name}.{uuid.uuid4().hex}.bak")
                try:
                    os.link(final, backup, follow_symlinks=False)
                except OSError:
                    backup = None  # no hard links here: the old file cannot be restored, only replaced
            try:
                os.replace(tmp, final)
            except BaseException:
                if backup is not None:
                    _remove(backup)
                raise
            done.append((final, backup))
    except BaseException:
        for final, backup in reversed(done):  # undo the renames already made
            if backup is not None:
                try:
                    os.replace(backup, final)
                except OSError:
                    pass
            else:
                _remove(final)
        for tmp in temps:
            _remove(tmp)
        raise
    for _, backup in done:
        if backup is not None:
            _remove(backup)
    _fsync_dir(directory)
