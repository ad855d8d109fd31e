"""The per-device slice cache: one safetensors file per block (a layer's attention or MLP slice).

Folder: <cache>/slices/<model hash>/<dtype>-q<a>_<b>-m<c>_<d>-b<0|1>/ with block files `L007.attn.safetensors`,
`L007.mlp.safetensors` and a `manifest.json` (size and SHA-256 of each) written last. Every file is written to a
temporary name, flushed to disk and renamed, so a crash never leaves a file under its final name; a file whose
size or checksum is wrong is deleted and fetched again, never used. Blocks that stay are read into private memory;
blocks streamed per token are mapped, so a released block leaves no resident pages behind.
"""

from __future__ import annotations

import ctypes
import errno
import hashlib
import json
import mmap
import os
import shutil
import struct
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import MeshError
from ..model.loader import BlockTensors
from ..model.shard import Shard

BLOCK_KINDS = ("attn", "mlp")
_DTYPES = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16, "U8": torch.uint8, "I8": torch.int8}


class CacheError(MeshError):
    """The slice cache cannot be written (disk full, permissions): names the folder and the fix."""


class BlockDamagedError(CacheError):
    """A streamed block's bytes do not match the SHA-256 the originator sent: it is asked for again."""


def block_name(index: int) -> str:
    """Block index (2 * layer + phase) -> file name."""
    return f"L{index // 2:03d}.{BLOCK_KINDS[index % 2]}.safetensors"


def shard_folder(root: Path, model_hash: str, shard: Shard, dtype: str) -> Path:
    return (Path(root) / "slices" / model_hash[:24] /
            (f"{dtype}-q{shard.q_start}_{shard.q_stop}-m{shard.mlp_start}_{shard.mlp_stop}-b{int(shard.owns_bias)}"
             + (f"-l{shard.layer_start}_{shard.layer_stop}" if shard.partial_layers else "")))


ALIGN = 64  # every tensor of a block file starts at a multiple of this (the quantized kernels need it)
_NAMES = {v: k for k, v in _DTYPES.items()}


def serialize_block(block: BlockTensors) -> bytes:
    """A block's tensors -> the bytes of its file (see block_chunks)."""
    return b"".join(block_chunks(block))


def block_chunks(block: BlockTensors) -> list:
    """A block's tensors -> the pieces of its safetensors file, the format of each weight in the file's metadata.

    Each tensor's data starts on an ALIGN-byte boundary of the file (padding goes in `__pad` tensors, so the file
    stays valid safetensors): mapped or read into aligned memory, no tensor needs a copy to be aligned. (The int8
    kernel reads past an int8 matrix that starts at an odd address and crashes the process.)"""
    entries, chunks, pos = {}, [], 0
    for name in sorted(block.tensors):
        t = block.tensors[name].contiguous()
        if pos % ALIGN:
            pad = ALIGN - pos % ALIGN
            entries[f"__pad{len(entries)}"] = {"dtype": "U8", "shape": [pad], "data_offsets": [pos, pos + pad]}
            chunks.append(bytes(pad))
            pos += pad
        data = memoryview(t.reshape(-1).view(torch.uint8).numpy()) if t.numel() else b""  # no copy
        entries[name] = {"dtype": _NAMES[t.dtype], "shape": list(t.shape), "data_offsets": [pos, pos + len(data)]}
        chunks.append(data)
        pos += len(data)
    header = json.dumps({"__metadata__": block.metadata(), **entries}, separators=(",", ":")).encode()
    header += b" " * (-(8 + len(header)) % ALIGN)  # the data starts aligned too (trailing spaces are allowed)
    return [struct.pack("<Q", len(header)), header, *chunks]


def read_block(path: Path, rate: float | None = None, *, mapped: bool = False) -> tuple[BlockTensors, int]:
    """Read a block file -> (its tensors, bytes read). Blocking: call from the I/O executor.

    mapped=False copies the file into private memory (blocks that stay resident for good). mapped=True maps it
    read-only and faults every page in now (MAP_POPULATE), so the reading happens here, off the compute thread,
    with no second copy; the pages leave this process when the block's tensors are dropped. `rate` caps the read
    at that many bytes/s: a test hook that emulates a slow disk.
    """
    t0 = time.perf_counter()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if mapped and size:
            buf = _map_populated(f.fileno(), size)
        else:
            store = torch.empty(size, dtype=torch.uint8)  # torch's allocations are 64-byte aligned
            buf = store.numpy()
            view = memoryview(buf)
            pos = 0
            while pos < size:
                n = f.readinto(view[pos:pos + (4 << 20)])
                if not n:
                    raise OSError(errno.EIO, f"{path} shrank while being read")
                pos += n
    if rate:
        ahead = size / rate - (time.perf_counter() - t0)
        if ahead > 0:
            time.sleep(ahead)
    (hlen,) = struct.unpack_from("<Q", buf)
    header = json.loads(bytes(buf[8:8 + hlen]))
    base = 8 + hlen
    out = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # a read-only map: the weights are never written
        for name, info in header.items():
            if name == "__metadata__" or name.startswith("__pad"):
                continue
            a, b = info["data_offsets"]
            dt = _DTYPES[info["dtype"]]
            t = torch.frombuffer(buf, dtype=dt, count=(b - a) // dt.itemsize, offset=base + a) if b > a \
                else torch.empty(0, dtype=dt)
            out[name] = t.reshape(info["shape"])
    return BlockTensors.from_file(out, header.get("__metadata__")), size


def localize_block(path: Path, digest: str) -> tuple[int, str]:
    """Rewrite a verified block file in the form this machine's kernels run (int4 in their packed layout); returns
    the (size, SHA-256) of the file now on disk. A block with nothing to convert is left as it came."""
    block, size = read_block(path, mapped=True)  # no private copy: the conversion reads the file's pages
    local = block.device_form()
    if local.specs == block.specs:
        return size, digest
    chunks = block_chunks(local)  # views of the converted tensors (the portable ones are no longer needed)
    del block
    _atomic_write(path, chunks, path.parent)
    h = hashlib.sha256()
    for c in chunks:
        h.update(c)
    return sum(map(len, chunks)), h.hexdigest()


MADV_POPULATE_READ = getattr(mmap, "MADV_POPULATE_READ", 22)  # Linux 5.14+; Python 3.11 lacks the name
_POPULATE_READ = True  # cleared at the first failure (an older kernel), so the failing call is not retried per block


def _libc_madvise():
    try:
        fn = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):  # not a libc we can load: fall back to mmap.madvise
        return None
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int], ctypes.c_int
    return fn


_MADVISE = _libc_madvise()


def _madvise(buf: mmap.mmap, advice: int) -> None:
    """madvise over a whole mapping with the GIL released.

    mmap.madvise holds the GIL for the length of the call, and MADV_POPULATE_READ of a block coming from disk takes
    tens of milliseconds: the event loop and the compute thread's Python side would stop for that long. A ctypes
    call releases the GIL.
    """
    if _MADVISE is None:
        buf.madvise(advice)
        return
    view = np.frombuffer(buf, dtype=np.uint8)  # read-only view: only to learn the address
    addr, size = view.ctypes.data, view.size
    del view
    if _MADVISE(addr, size, advice) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))


def _map_huge(fd: int, size: int) -> mmap.mmap:
    """Map a file read-only, asking for huge pages where the kernel has them (a no-op elsewhere)."""
    buf = mmap.mmap(fd, size, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    if hasattr(mmap, "MADV_HUGEPAGE"):
        try:
            buf.madvise(mmap.MADV_HUGEPAGE)  # instant: only sets a flag on the mapping
        except OSError:
            pass
    return buf


def _map_populated(fd: int, size: int) -> mmap.mmap:
    """Map a file read-only with every page mapped now.

    The mapping asks for huge pages first: where the file system keeps large folios in the page cache (ext4 and
    XFS on recent kernels, for files written in large chunks or read in through this mapping) each 2 MiB is then
    one page-table entry instead of 512, which makes mapping and unmapping a block per token about 10x cheaper.
    Where the kernel cannot, the calls fail or do nothing and ordinary pages are used.
    """
    global _POPULATE_READ
    if _POPULATE_READ:
        buf = _map_huge(fd, size)
        try:
            _madvise(buf, MADV_POPULATE_READ)
            return buf
        except OSError:  # a kernel before 5.14: from now on, map populated at mmap time (every block, every token)
            buf.close()
            _POPULATE_READ = False
    return mmap.mmap(fd, size, flags=mmap.MAP_SHARED | getattr(mmap, "MAP_POPULATE", 0), prot=mmap.PROT_READ)


def _advise(path: Path, advice: int) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.posix_fadvise(fd, 0, 0, advice)
    except OSError:
        pass
    finally:
        os.close(fd)


def drop_cached_pages(path: Path) -> None:
    """Ask the kernel to drop a file's clean pages from the page cache (blocking: the I/O executor)."""
    _advise(path, os.POSIX_FADV_DONTNEED)


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read through a huge-page mapping: a file that comes in from disk here lands in the page
    cache as large folios, so the per-token mappings of a window stay cheap (read() would leave small ones)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if not size:
            return h.hexdigest()
        with _map_huge(f.fileno(), size) as buf:
            view = memoryview(buf)
            try:
                for off in range(0, size, 1 << 20):
                    h.update(view[off:off + (1 << 20)])
            finally:
                view.release()
    return h.hexdigest()


class SliceCache:
    """One shard's block files under a cache folder."""

    def __init__(self, root: Path, model_hash: str, shard: Shard, dtype: str, num_blocks: int) -> None:
        self.folder = shard_folder(root, model_hash, shard, dtype)
        self.num_blocks = num_blocks
        self.manifest_path = self.folder / "manifest.json"

    def path(self, index: int) -> Path:
        return self.folder / block_name(index)

    def _manifest(self) -> dict[str, Any]:
        try:
            return json.loads(self.manifest_path.read_text())
        except (OSError, json.JSONDecodeError):
            return {}

    def check(self) -> tuple[list[int], dict[int, int]]:
        """Verify every block against the manifest: (indices to fetch, sizes of the good ones).

        A file that is missing, truncated, or whose SHA-256 differs is deleted here and listed for fetching.
        """
        entries = self._manifest().get("blocks", {})
        missing, sizes = [], {}
        for i in range(self.num_blocks):
            p, entry = self.path(i), entries.get(str(i))
            ok = entry is not None and p.exists() and p.stat().st_size == entry["size"] and \
                sha256_file(p) == entry["sha256"]
            if ok:
                sizes[i] = entry["size"]
            else:
                missing.append(i)
                p.unlink(missing_ok=True)
        return missing, sizes

    def begin_block(self, index: int) -> "BlockWriter":
        self.folder.mkdir(parents=True, exist_ok=True)
        return BlockWriter(self.path(index), self.folder)

    def record(self, index: int, size: int, digest: str) -> None:
        """Add a stored block to the manifest (rewritten atomically); the shard is complete with its last block."""
        m = self._manifest() or {"version": 1, "blocks": {}}
        m["blocks"][str(index)] = {"size": size, "sha256": digest}
        m["complete"] = all(str(i) in m["blocks"] for i in range(self.num_blocks))
        _atomic_write(self.manifest_path, json.dumps(m, indent=1).encode(), self.folder)

    def mark_complete(self) -> None:
        """Every block is present and checked: say so in the manifest (tidy keeps only complete shards)."""
        m = self._manifest()
        if m and m.get("complete") is not True:
            m["complete"] = True
            _atomic_write(self.manifest_path, json.dumps(m, indent=1).encode(), self.folder)

    @property
    def model_folder(self) -> Path:
        return self.folder.parent


class BlockWriter:
    """Writes one block file from chunks: temp file, checksum, fsync, rename."""

    def __init__(self, path: Path, folder: Path) -> None:
        self.path = path
        self.folder = folder
        self.tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")  # unique: sessions may race
        self._hash = hashlib.sha256()
        self.size = 0
        try:
            self._f = open(self.tmp, "wb")
        except OSError as e:
            raise _cache_error(e, folder) from e

    def write(self, data: bytes) -> None:
        try:
            self._f.write(data)
        except OSError as e:
            self.abort()
            raise _cache_error(e, self.folder) from e
        self._hash.update(data)
        self.size += len(data)

    def finish(self, expected_sha256: str) -> str:
        """Close, verify, flush to disk and rename into place; returns the digest."""
        digest = self._hash.hexdigest()
        try:
            self._f.flush()
            os.fsync(self._f.fileno())
            self._f.close()
        except OSError as e:
            self.abort()
            raise _cache_error(e, self.folder) from e
        if digest != expected_sha256:
            self.abort()
            raise BlockDamagedError(f"block {self.path.name} arrived corrupted (SHA-256 {digest[:12]} != "
                                    f"{expected_sha256[:12]}); it will be fetched again")
        os.replace(self.tmp, self.path)
        return digest

    def abort(self) -> None:
        try:
            self._f.close()
        except OSError:
            pass
        self.tmp.unlink(missing_ok=True)


def _atomic_write(path: Path, data: bytes | list, folder: Path) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.part")
    try:
        with open(tmp, "wb") as f:
            for piece in data if isinstance(data, list) else [data]:
                f.write(piece)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _cache_error(e, folder) from e


def _cache_error(e: OSError, folder: Path) -> CacheError:
    if e.errno == errno.ENOSPC:
        free = shutil.disk_usage(folder).free if folder.exists() else 0
        return CacheError(f"no space left on the device writing the slice cache in {folder} ({free} bytes free); "
                          f"free some disk or point --cache-dir at a larger disk")
    return CacheError(f"cannot write the slice cache in {folder}: {e.strerror or e}")


# -- the cache as a whole: tidy at start, a size cap with least-recently-used eviction of whole models ------------

STAMP = ".last-used"  # in a model's folder: touched whenever a session loads one of its shards
STALE_S = 600.0  # unfinished work older than this is junk (younger may be another device's stream in progress)


def cache_bytes(root: Path) -> int:
    """Bytes of every file under <root>/slices."""
    total = 0
    for dirpath, _, files in os.walk(Path(root) / "slices"):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def _manifest_blocks(folder: Path) -> dict[str, Any] | None:
    try:
        m = json.loads((folder / "manifest.json").read_text())
        blocks = m["blocks"]
        # a manifest from before `complete` was written counts as finished (its blocks are still checksummed)
        return blocks if isinstance(blocks, dict) and m.get("complete", True) is True else None
    except (OSError, ValueError, KeyError, TypeError):
        return None


def tidy(root: Path, now: float | None = None) -> list[Path]:
    """Remove from <root>/slices what no finished, checksummed shard owns: temporary and unknown files, block
    files their manifest does not list (or lists with another size), shard folders never finished. Anything
    modified in the last STALE_S seconds is left alone (another device sharing the cache may be writing it).
    Returns what was removed."""
    now = time.time() if now is None else now
    removed: list[Path] = []
    base = Path(root) / "slices"
    if not base.is_dir():
        return removed

    def old(p: Path) -> bool:
        try:
            return now - p.lstat().st_mtime > STALE_S
        except OSError:
            return False

    def drop(p: Path) -> None:
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            p.unlink(missing_ok=True)
        removed.append(p)

    for model in list(base.iterdir()):
        if not model.is_dir() or model.is_symlink():
            if old(model):
                drop(model)
            continue
        for shard in list(model.iterdir()):
            if shard.name == STAMP:
                continue
            if not shard.is_dir() or shard.is_symlink():
                if old(shard):
                    drop(shard)
                continue
            blocks = _manifest_blocks(shard)
            if blocks is None:
                if old(shard) and all(old(f) for f in shard.iterdir()):
                    drop(shard)  # never finished, and nobody is writing to it
                continue
            wanted = {"manifest.json": None, **{block_name(int(i)): e.get("size") for i, e in blocks.items()
                                                 if str(i).isdigit() and isinstance(e, dict)}}
            for f in list(shard.iterdir()):
                if f.name not in wanted:
                    if old(f):
                        drop(f)
                elif wanted[f.name] is not None and f.lstat().st_size != wanted[f.name]:
                    drop(f)  # checked again (and fetched) at its next load
        emptied = any(p.parent == model for p in removed)  # by us, just now (that touched its mtime)
        if not any(p.name != STAMP for p in model.iterdir()) and (emptied or old(model)):
            drop(model)
    return removed


def touch(model_folder: Path) -> None:
    """Mark a model's folder as used now (for least-recently-used eviction)."""
    model_folder.mkdir(parents=True, exist_ok=True)
    (model_folder / STAMP).touch()


def _last_used(model_folder: Path) -> float:
    try:
        return (model_folder / STAMP).stat().st_mtime
    except OSError:
        try:
            return model_folder.stat().st_mtime
        except OSError:
            return 0.0


def evict(root: Path, cap: int, keep: set[Path]) -> list[tuple[Path, int]]:
    """While the cache is over `cap` bytes, remove whole models, least recently used first, never one in `keep`
    (the models of live sessions). Returns (folder, bytes) of each removed."""
    base = Path(root) / "slices"
    removed: list[tuple[Path, int]] = []
    total = cache_bytes(root)
    if total <= cap or not base.is_dir():
        return removed
    models = sorted((p for p in base.iterdir() if p.is_dir() and p not in keep), key=_last_used)
    for model in models:
        if total <= cap:
            break
        size = sum(f.stat().st_size for f in model.rglob("*") if f.is_file())
        shutil.rmtree(model, ignore_errors=True)
        removed.append((model, size))
        total -= size
    return removed
