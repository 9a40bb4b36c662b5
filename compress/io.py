"""Writing to disk without ever losing data: atomic files, atomic directories, and ownership.

The rules every writer of the toolkit follows:

* a file is written to a temporary sibling and renamed into place (``atomic_write_bytes``): readers see
  the old file or the new one, never half of one;
* an output directory (artifact, export, engine) is written to ``.NAME.partial-PID-*`` beside its target
  and renamed into place once complete (``atomic_directory``). The rename never replaces a directory
  that appeared in the meantime (``renameat2(RENAME_NOREPLACE)`` on Linux);
* the toolkit deletes or replaces only what it can prove it wrote: a directory of a known ``kind``
  whose marker file says so and which holds nothing else (``check_owned``). ``force`` replaces such a
  directory and nothing else;
* a write interrupted by a crash or a kill leaves only hidden ``.NAME.partial-PID-*`` / ``.NAME.old-PID-*``
  siblings; the next write to the same place removes those of dead processes (and restores a replaced
  directory whose replacement never landed).
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import json
import os
import re
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from pathlib import Path

from compress.errors import DitCompressError


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return mask


NEW_FILE_MODE = 0o666 & ~_umask()  # what open(path, "w") gives a new file; the umask is read once, at import
# (os.umask is process-wide: not something to flip per write). Writers that create files through a library
# that uses owner-only permissions (safetensors' save_file writes 0600) chmod them to this.


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write ``data`` to a temp file beside ``path``, fsync it and rename it into place.

    The file gets the permissions a plain ``open(path, "w")`` would give it (those of the file it replaces, else
    0666 less the umask), not ``mkstemp``'s owner-only 0600."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        mode = path.stat().st_mode & 0o7777
    except FileNotFoundError:
        mode = NEW_FILE_MODE
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


# ---- kinds of directories the toolkit writes -----------------------------------------------------
@dataclass(frozen=True)
class DirKind:
    """A kind of output directory: its marker file, the format the marker names, and the files it may hold."""

    name: str  # what a user calls it: "artifact", "ONNX export", ...
    marker: str  # JSON file whose "format" key is ``format``
    format: str
    files: tuple[str, ...]  # glob patterns of every file such a directory may contain (marker included)


ARTIFACT = DirKind("artifact", "manifest.json", "dit-compress-artifact", ("manifest.json", "model.safetensors"))
ONNX_EXPORT = DirKind("ONNX export", "export.json", "dit-compress-onnx",
                      ("export.json", "model.onnx", "model.onnx.data", "segment-*.onnx", "segment-*.onnx.data"))
OPENVINO_EXPORT = DirKind("OpenVINO export", "export.json", "dit-compress-openvino",
                          ("export.json", "model.xml", "model.bin"))
TRT_ENGINE = DirKind("TensorRT engine", "engine.json", "dit-compress-tensorrt", ("engine.json", "model.engine"))
WORKDIR = DirKind("work directory", ".dit-compress-workdir", "dit-compress-workdir",
                  (".dit-compress-workdir", "*.pt", ".*.tmp"))
KINDS = (ARTIFACT, ONNX_EXPORT, OPENVINO_EXPORT, TRT_ENGINE, WORKDIR)


def marker_format(d: Path, marker: str) -> str | None:
    """The ``format`` named by ``d/marker`` (None if absent or unreadable)."""
    try:
        data = json.loads((d / marker).read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return data.get("format") if isinstance(data, dict) else None


def kind_of(d: Path) -> DirKind | None:
    """The kind of toolkit directory ``d`` is, judged by its marker alone (None if it is not one)."""
    for k in KINDS:
        if marker_format(d, k.marker) == k.format:
            return k
    return None


def check_owned(d: Path, kinds: tuple[DirKind, ...], what: str) -> DirKind:
    """Raise unless ``d`` is a directory of one of ``kinds`` holding only that kind's files; returns the kind.

    ``what`` names the option that would delete it (e.g. '--force'), for the message.
    """
    d = Path(d)
    if d.is_symlink() or not d.is_dir():
        raise DitCompressError(f"{d}: exists and is not a directory dit-compress wrote; refusing to replace it with "
                               f"{what}. Choose another output path.")
    k = kind_of(d)
    if k is None or k not in kinds:
        found = f"a {k.name}" if k else "not written by dit-compress (no marker file)"
        raise DitCompressError(f"{d}: exists and is {found}; {what} only replaces a dit-compress "
                               f"{' or '.join(x.name for x in kinds)}. Choose another output path, or move it away "
                               f"yourself.")
    extra = sorted(p.name for p in d.iterdir() if not any(_fnmatch(p.name, pat) for pat in k.files) or p.is_dir())
    if extra:
        raise DitCompressError(f"{d}: a {k.name}, but it also holds {', '.join(extra[:5])}"
                               f"{' ...' if len(extra) > 5 else ''}, which dit-compress did not write; refusing to "
                               f"replace it with {what}. Move those files away first.")
    return k


def _fnmatch(name: str, pattern: str) -> bool:
    import fnmatch

    return fnmatch.fnmatchcase(name, pattern)


def check_parent_writable(out: Path) -> None:
    """Fail fast if ``out`` could not be created: its nearest existing ancestor is a file or not writable."""
    out = Path(out)
    probe = out.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir():
        raise DitCompressError(f"{out}: cannot be created: {probe} is a file, not a directory.")
    try:  # a real write, not os.access: root ignores permission bits but not read-only filesystems
        os.rmdir(tempfile.mkdtemp(prefix=".dit-compress-probe-", dir=probe))
    except OSError as e:
        raise DitCompressError(f"{out}: cannot be created: {probe} is not writable ({e.strerror}).") from None


def check_output_path(out: Path, kinds: tuple[DirKind, ...], force: bool) -> None:
    """Fail fast, before any long work, if ``out`` cannot be written (or replaced) as one of ``kinds``."""
    out = Path(out)
    check_parent_writable(out)
    if out.exists() or out.is_symlink():
        if not force:
            raise DitCompressError(f"{out}: already exists; pass --force (force=True) to replace it.")
        check_owned(out, kinds, "--force")


# ---- atomic directories ----------------------------------------------------------------------------
_RENAME_NOREPLACE = 1
_AT_FDCWD = -100


def _renameat2():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        fn = libc.renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    return fn


_RENAMEAT2 = _renameat2()


def rename_noreplace(src: Path, dst: Path) -> None:
    """Rename ``src`` to ``dst``, failing with FileExistsError if ``dst`` exists (even an empty directory)."""
    if _RENAMEAT2 is not None:
        r = _RENAMEAT2(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE)
        if r == 0:
            return
        err = ctypes.get_errno()
        if err == errno.EEXIST or err == errno.ENOTEMPTY:
            raise FileExistsError(err, f"{dst} appeared while it was being written", str(dst))
        if err not in (errno.ENOSYS, errno.EINVAL):  # filesystem without RENAME_NOREPLACE: fall through
            raise OSError(err, os.strerror(err), str(dst))
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, f"{dst} appeared while it was being written", str(dst))
    os.rename(src, dst)


_SIBLING = re.compile(r"^\.(?P<name>.+)\.(?P<what>partial|old)-(?P<pid>\d+)-[0-9a-f]{8}$")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def recover_siblings(out: Path) -> list[str]:
    """Clean up after writers of ``out`` that died: returns what was done (for a note to the user).

    ``.NAME.partial-PID-*`` of a dead process is removed; ``.NAME.old-PID-*`` (a directory moved aside to be
    replaced) is moved back if ``out`` is missing, else removed. Siblings of live processes are left alone.
    """
    out = Path(out)
    done = []
    if not out.parent.is_dir():
        return done
    for p in sorted(out.parent.iterdir()):
        m = _SIBLING.match(p.name)
        if not m or m["name"] != out.name:
            continue
        pid = int(m["pid"])
        if pid == os.getpid() or _alive(pid):  # a write in progress
            continue
        if m["what"] == "old" and not os.path.lexists(out):
            os.rename(p, out)
            done.append(f"restored {out} from an interrupted replacement ({p.name})")
        else:
            shutil.rmtree(p, ignore_errors=True)
            done.append(f"removed {p.name}, left by an interrupted write (process {m['pid']})")
    return done


@contextlib.contextmanager
def atomic_directory(out: str | Path, kinds: tuple[DirKind, ...], *, force: bool = False):
    """Yield a temp directory beside ``out``; on success it becomes ``out`` in one rename, on error it goes.

    Without ``force`` an existing ``out`` is an error (checked again at the rename: a directory that
    appears meanwhile is never replaced). With ``force`` only an owned directory of one of ``kinds`` is
    replaced: it is moved aside, the new one renamed in, then the old one removed.
    """
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    recover_siblings(out)
    check_output_path(out, kinds, force)
    tag = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    tmp = out.parent / f".{out.name}.partial-{tag}"
    tmp.mkdir()
    try:
        yield tmp
        for f in tmp.iterdir():  # durable before it becomes visible
            if f.is_file():
                with open(f, "rb") as fh:
                    os.fsync(fh.fileno())
        if os.path.lexists(out):
            if not force:
                raise DitCompressError(f"{out}: appeared while it was being written; nothing was replaced (the new "
                                       f"result is discarded). Run again with another --out.")
            check_owned(out, kinds, "--force")
            old = out.parent / f".{out.name}.old-{tag}"
            os.rename(out, old)
            try:
                rename_noreplace(tmp, out)
            except BaseException:
                if not os.path.lexists(out):
                    os.rename(old, out)
                raise
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                rename_noreplace(tmp, out)
            except FileExistsError:
                raise DitCompressError(f"{out}: appeared while it was being written; nothing was replaced (the new "
                                       f"result is discarded). Run again with another --out.") from None
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_marker(d: Path, kind: DirKind, content: dict) -> None:
    """The kind's marker file in ``d`` (its ``format`` first), written atomically."""
    atomic_write_text(Path(d) / kind.marker, json.dumps({"format": kind.format, **content}, indent=2,
                                                          allow_nan=False) + "\n")


# ---- work directories -------------------------------------------------------------------------------
class WorkDir:
    """Where training passes checkpoint. Deletes, at the end, only what it can prove it wrote.

    A directory the toolkit creates gets a marker file and is removed entirely on ``finish``; in a
    directory the user gave that already existed, only the checkpoint files this run wrote go.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.created = False
        self.written: set[str] = set()
        if os.path.lexists(self.path):
            if not self.path.is_dir():
                raise DitCompressError(f"{self.path}: the work directory is a file; choose another --workdir.")
            self.created = kind_of(self.path) is WORKDIR
        else:
            self.path.mkdir(parents=True)
            write_marker(self.path, WORKDIR, {"pid": os.getpid()})
            self.created = True

    def file(self, name: str) -> Path:
        """Path of a checkpoint file this run writes (remembered, so ``finish`` removes it)."""
        self.written.add(name)
        return self.path / name

    def finish(self) -> None:
        """After success: remove the directory if the toolkit made it, else only the files this run wrote."""
        if self.created:
            try:
                check_owned(self.path, (WORKDIR,), "cleaning up the work directory")
            except DitCompressError:  # somebody put other files in it: leave those, remove ours
                pass
            else:
                shutil.rmtree(self.path, ignore_errors=True)
                return
        for name in self.written:
            with contextlib.suppress(FileNotFoundError):
                (self.path / name).unlink()
