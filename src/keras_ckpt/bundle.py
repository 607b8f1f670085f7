"""TensorFlow's checkpoint file format, written in one pass.

A TensorFlow checkpoint `<prefix>` is two files (TensorFlow's "tensor
bundle", `tensorflow/core/util/tensor_bundle`):

- `<prefix>.data-00000-of-00001`: the tensors' bytes back to back;
- `<prefix>.index`: a LevelDB-format table (`tsl/lib/io/table_builder`)
  mapping each tensor's key to a `BundleEntryProto` (dtype, shape, offset,
  size, masked CRC32C of the bytes); the empty key holds the
  `BundleHeaderProto`.

`write()` produces these files byte for byte as `tf.train.Checkpoint.write`
does for the same tensors (tests/test_bundle.py compares the two), so
`tf.train.load_checkpoint()`, `tf.train.Checkpoint.restore()` and
`tf.train.CheckpointManager` read them as their own. What it does
differently is how:

- one pass: each tensor's buffer goes straight from the snapshot to the
  file, chunk by chunk, its CRC32C (for the index) computed while the chunk
  is in cache; the whole file's CRC32C (the manifest's checksum) is combined
  from the tensors' in a few arithmetic steps, so no byte is read twice and
  the file is never read back;
- the data file is written with O_DIRECT where the file system takes it:
  the disk reads two reused staging buffers, so no page cache is allocated
  and filled (most of a buffered write's CPU time); elsewhere, through the
  page cache, the disk starts writing each chunk as soon as it is there
  (`sync_file_range`), so the final fsync finds little left to write.
  `KERAS_CKPT_DIRECT_IO=0` turns O_DIRECT off;
- every native call (the write, the checksums) releases the GIL, and the
  chunks are large enough that the training thread rarely waits for it;
- each tensor is dropped once written, so the memory a snapshot holds
  shrinks as the write proceeds instead of at its end;
- `cancelled()` is polled between chunks, so a newer save can supersede
  this one within a chunk's time.

Measured against TensorFlow's own writer in docs/performance.md.
This module does not import TensorFlow: callers pass numpy arrays and
TensorFlow's `DataType` numbers.
"""

import concurrent.futures
import ctypes
import ctypes.util
import errno
import fcntl
import functools
import glob
import mmap
import os
import struct
import sys
import threading

import numpy as np

DATA_SUFFIX = ".data-00000-of-00001"
INDEX_SUFFIX = ".index"
OBJECT_GRAPH_KEY = "_CHECKPOINTABLE_OBJECT_GRAPH"

# `DataType` numbers (tensorflow/core/framework/types.proto) whose tensors a
# bundle stores as their raw little-endian buffer, with their item size.
RAW_DTYPES = {
    1: 4,  # float32
    2: 8,  # float64
    3: 4,  # int32
    4: 1,  # uint8
    5: 2,  # int16
    6: 1,  # int8
    8: 8,  # complex64
    9: 8,  # int64
    10: 1,  # bool
    14: 2,  # bfloat16
    17: 2,  # uint16
    18: 16,  # complex128
    19: 2,  # float16
    22: 4,  # uint32
    23: 8,  # uint64
}
DT_STRING = 7

_CHUNK = 8 << 20  # bytes per write/checksum call
_DIRECT_ALIGN = 4096  # O_DIRECT: buffer address, size and offset
_BLOCK_SIZE = 262144  # tsl::table::Options defaults
_BLOCK_RESTART_INTERVAL = 16
_TABLE_MAGIC = 0xDB4775248B80FB57
_FOOTER_HANDLES = 40  # 2 * BlockHandle::kMaxEncodedLength
_MASK_DELTA = 0xA282EAD8
_HEADER = b"\x08\x01\x1a\x02\x08\x01"  # num_shards: 1, version {producer: 1}


class Cancelled(Exception):
    """Raised by `write()` when `cancelled()` turned true; files removed."""


def supported(dtype_enum):
    """Whether `write()` can store tensors of this TensorFlow `DataType`."""
    return sys.byteorder == "little" and (
        dtype_enum in RAW_DTYPES or dtype_enum == DT_STRING)


def write(prefix, entries, *, cancelled=None, progress=None):
    """Writes the checkpoint `prefix`: its data file, then its index.

    Args:
        prefix: str, the checkpoint prefix (`<dir>/ckpt-<N>`).
        entries: list of `(key, dtype_enum, shape, value)`, in the order
            the data file holds them. `value` is a C-contiguous numpy array
            holding the tensor's bytes (any numpy dtype: a uint8 view of the
            buffer will do), or for `DT_STRING` an array of bytes objects;
            or a callable returning one, called when the tensor is written.
            Each item is set to None once written, so a tensor the caller
            holds no other reference to is freed then.
        cancelled: callable or None, polled between chunks; when it returns
            True the files are removed and `Cancelled` is raised.
        progress: callable or None, called with the bytes of each chunk
            written.

    Returns:
        `{filename: (size, crc32c_hex)}` for the two files, data first.

    Raises:
        Cancelled: see `cancelled`.
        OSError: the file system refused a write (partial files removed).
        ValueError: an entry this format cannot hold (see `supported()`).
    """
    data_path, index_path = prefix + DATA_SUFFIX, prefix + INDEX_SUFFIX
    keys = [entry[0] for entry in entries]
    if len(set(keys)) != len(keys):
        raise ValueError("Tensor keys must be unique.")
    # (No loop variable may keep the last entry's value alive.)
    for key, dtype_enum in [entry[:2] for entry in entries]:
        if not isinstance(key, str) or not supported(dtype_enum):
            raise ValueError(
                f"Cannot write tensor {key!r} of DataType {dtype_enum}.")
    try:
        data = _write_data(data_path, entries, cancelled, progress)
        index_bytes = _index(data["entries"])
        _write_bytes(index_path, index_bytes)
    except BaseException:
        for path in (data_path, index_path):
            try:
                os.remove(path)
            except OSError:
                pass
        raise
    return {
        os.path.basename(data_path): (data["size"], f"{data['crc']:08x}"),
        os.path.basename(index_path): (
            len(index_bytes), f"{_crc32c(0, index_bytes):08x}"),
    }


# ---------------------------------------------------------------------------
# The data file.
# ---------------------------------------------------------------------------


def _taken_in_order(entries):
    """The entries in order, each set to None once taken."""
    for i in range(len(entries)):
        key, dtype_enum, shape, value = entries[i]
        entries[i] = None
        yield key, dtype_enum, shape, value() if callable(value) else value


def _write_data(path, entries, cancelled, progress):
    index_entries = {}
    file_crc = 0
    offset = 0
    sink = _open_sink(path)
    try:
        for key, dtype_enum, shape, value in _taken_in_order(entries):
            shape = tuple(int(d) for d in shape)
            count = int(np.prod(shape, dtype=np.int64))
            if dtype_enum == DT_STRING:
                array = np.asarray(value, dtype=object)
                if array.size != count:
                    raise ValueError(
                        f"Tensor {key!r}: {array.size} strings for shape "
                        f"{list(shape)}.")
                pieces = _string_pieces(array)
                tensor_crc = pieces.pop()
            else:
                array = np.asarray(value)
                if not array.flags.c_contiguous:
                    array = np.array(array, order="C")
                if array.nbytes != count * RAW_DTYPES[dtype_enum]:
                    raise ValueError(
                        f"Tensor {key!r}: {array.nbytes} bytes do not match "
                        f"shape {list(shape)} of DataType {dtype_enum}.")
                pieces = [array.reshape(-1).view(np.uint8)]
                tensor_crc = None
            del value, array
            start, crc = offset, 0
            for piece in pieces:
                for begin in range(0, len(piece), _CHUNK):
                    chunk = piece[begin:begin + _CHUNK]
                    crc = _crc32c(crc, chunk)
                    sink.write(chunk)
                    offset += len(chunk)
                    if progress is not None:
                        progress(len(chunk))
                    if cancelled is not None and cancelled():
                        raise Cancelled(path)
            chunk = pieces = None
            file_crc = crc32c_combine(file_crc, crc, offset - start)
            index_entries[key] = _entry(
                dtype_enum, shape, start, offset - start,
                _mask(crc if tensor_crc is None else tensor_crc))
        sink.finish(offset)
    finally:
        sink.close()
    return {"entries": index_entries, "size": offset, "crc": file_crc}


def _open_sink(path):
    flags = os.O_WRONLY | os.O_CREAT | os.O_TRUNC
    if _direct_io_enabled():
        try:
            return _DirectSink(os.open(path, flags | os.O_DIRECT, 0o644))
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.EOPNOTSUPP):
                raise
    return _BufferedSink(os.open(path, flags, 0o644))


def _direct_io_enabled():
    return hasattr(os, "O_DIRECT") and os.environ.get(
        "KERAS_CKPT_DIRECT_IO", "1").strip().lower() not in (
            "0", "false", "no", "off")


class _BufferedSink:
    """Writes through the page cache, starting each chunk's writeback at
    once (where the disk is fast, or O_DIRECT is refused)."""

    def __init__(self, fd):
        self.fd = fd
        self.offset = 0

    def write(self, chunk):
        _write_all(self.fd, chunk)
        _start_writeback(self.fd, self.offset, len(chunk))
        self.offset += len(chunk)

    def finish(self, size):
        pass

    def close(self):
        os.close(self.fd)


class _DirectSink:
    """Writes with O_DIRECT: the disk reads two reused, aligned staging
    buffers, so the write allocates no page cache.

    Copying the state into page-cache pages is most of a buffered write's
    CPU time, and on a VM whose memory is backed on demand each new page
    costs a fault in the hypervisor: measured here, 0.75-3.8 s per GB
    buffered against 0.86-1.07 s direct, at half the CPU time
    (docs/performance.md). One buffer is filled (a memcpy) while the other
    is written by a helper thread that mostly waits on the disk. The tail
    is padded to the alignment and the file truncated to its size.
    """

    def __init__(self, fd):
        self.fd = fd
        self.buffers = _take_staging()
        self.views = [np.frombuffer(b, np.uint8) for b in self.buffers]
        self.current = 0
        self.fill = 0
        self.pending = None
        self.pool = concurrent.futures.ThreadPoolExecutor(
            1, thread_name_prefix="keras_ckpt-direct-io")

    def write(self, chunk):
        done = 0
        while done < len(chunk):
            n = min(_CHUNK - self.fill, len(chunk) - done)
            self.views[self.current][self.fill:self.fill + n] = (
                chunk[done:done + n])
            self.fill += n
            done += n
            if self.fill == _CHUNK:
                self._submit(_CHUNK)

    def _submit(self, nbytes):
        if self.pending is not None:
            self.pending.result()  # the other buffer is free again
        view = memoryview(self.buffers[self.current])[:nbytes]
        self.pending = self.pool.submit(self._write, view)
        self.current ^= 1
        self.fill = 0

    def _write(self, view):
        try:
            _write_all(self.fd, view)
        except OSError as e:
            if e.errno != errno.EINVAL:
                raise
            # The file system takes O_DIRECT at open but not these writes
            # (an alignment it needs): the page cache from here on.
            fcntl.fcntl(self.fd, fcntl.F_SETFL,
                        fcntl.fcntl(self.fd, fcntl.F_GETFL) & ~os.O_DIRECT)
            _write_all(self.fd, view)

    def finish(self, size):
        if self.fill:
            padded = -(-self.fill // _DIRECT_ALIGN) * _DIRECT_ALIGN
            self.views[self.current][self.fill:padded] = 0
            self._submit(padded)
        if self.pending is not None:
            self.pending.result()
            self.pending = None
        os.ftruncate(self.fd, size)

    def close(self):
        try:
            if self.pending is not None:
                self.pending.exception()  # never close the fd under a write
        finally:
            self.pool.shutdown()
            os.close(self.fd)
            self.views = None
            _give_back_staging(self.buffers)


# Staging buffers are kept for the next save: touching 16 MiB of fresh
# memory each save costs page faults (slow on a VM that backs its memory
# on demand) on the writer's core.
_staging = []
_staging_lock = threading.Lock()


def _take_staging():
    with _staging_lock:
        while _staging:
            buffers = _staging.pop()
            if len(buffers[0]) == _CHUNK:
                return buffers
            _close(buffers)
    return [mmap.mmap(-1, _CHUNK) for _ in range(2)]


def _give_back_staging(buffers):
    with _staging_lock:
        if not _staging:
            _staging.append(buffers)
            return
    _close(buffers)


def _close(buffers):
    for buffer in buffers:
        try:
            buffer.close()
        except BufferError:  # a view still exists: freed with it
            pass


def _string_pieces(array):
    """A string tensor's pieces as the bundle stores them, then its CRC.

    [varint64 length]... [masked CRC32C of the lengths] [bytes]...; the
    tensor's checksum covers each length as a little-endian uint32 (uint64
    past 4 GiB), the masked length checksum, then the bytes
    (`WriteStringTensor` in tensor_bundle.cc).
    """
    values = []
    for element in array.reshape(-1):
        if isinstance(element, str):
            element = element.encode()
        if not isinstance(element, bytes):
            raise ValueError(f"String tensors hold bytes, not {element!r}.")
        values.append(element)
    lengths, crc = bytearray(), 0
    for value in values:
        lengths += _varint(len(value))
        fmt = "<I" if len(value) <= 0xFFFFFFFF else "<Q"
        crc = _crc32c(crc, struct.pack(fmt, len(value)))
    masked = struct.pack("<I", _mask(crc))
    crc = _crc32c(crc, masked)
    for value in values:
        crc = _crc32c(crc, value)
    pieces = [np.frombuffer(bytes(lengths) + masked, np.uint8)]
    pieces += [np.frombuffer(v, np.uint8) for v in values if v]
    return pieces + [crc]


def _write_all(fd, chunk):
    view = memoryview(chunk).cast("B")
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _start_writeback(fd, offset, nbytes):
    """Asks the kernel to start writing a range back to disk, not waiting."""
    sync_file_range = _sync_file_range()
    if sync_file_range is not None:
        sync_file_range(fd, offset, nbytes, 2)  # SYNC_FILE_RANGE_WRITE


@functools.cache
def _sync_file_range():
    if not sys.platform.startswith("linux"):
        return None
    try:
        function = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64,
                         ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


def _write_bytes(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        _write_all(fd, np.frombuffer(data, np.uint8))
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------
# The index: protobuf messages in a LevelDB table.
# ---------------------------------------------------------------------------


def _varint(value):
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number, payload):
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _entry(dtype_enum, shape, offset, size, masked_crc):
    """A serialized `BundleEntryProto` (proto3: zero fields are omitted)."""
    dims = b"".join(
        _field(2, b"\x08" + _varint(int(d)) if d else b"") for d in shape)
    out = b"\x08" + _varint(dtype_enum) + _field(2, dims)
    if offset:
        out += b"\x20" + _varint(offset)
    if size:
        out += b"\x28" + _varint(size)
    if masked_crc:
        out += b"\x35" + struct.pack("<I", masked_crc)
    return out


class _Block:
    """LevelDB's BlockBuilder: prefix-compressed keys, restart points."""

    def __init__(self, restart_interval):
        self.interval = restart_interval
        self.buffer = bytearray()
        self.restarts = [0]
        self.counter = 0
        self.last_key = b""

    def add(self, key, value):
        shared = 0
        if self.counter < self.interval:
            limit = min(len(self.last_key), len(key))
            while shared < limit and self.last_key[shared] == key[shared]:
                shared += 1
        else:
            self.restarts.append(len(self.buffer))
            self.counter = 0
        self.buffer += (_varint(shared) + _varint(len(key) - shared)
                        + _varint(len(value)) + key[shared:] + value)
        self.last_key = key
        self.counter += 1

    def size_estimate(self):
        return len(self.buffer) + 4 * len(self.restarts) + 4

    def finish(self):
        return bytes(self.buffer) + b"".join(
            struct.pack("<I", r) for r in self.restarts
        ) + struct.pack("<I", len(self.restarts))


def _shortest_separator(start, limit):
    """BytewiseComparator::FindShortestSeparator."""
    limit_length = min(len(start), len(limit))
    i = 0
    while i < limit_length and start[i] == limit[i]:
        i += 1
    if i < limit_length and start[i] < 0xFF and start[i] + 1 < limit[i]:
        return start[:i] + bytes([start[i] + 1])
    return start


def _short_successor(key):
    """BytewiseComparator::FindShortSuccessor."""
    for i, byte in enumerate(key):
        if byte != 0xFF:
            return key[:i] + bytes([byte + 1])
    return key


def _index(entries):
    """The index file: a LevelDB table of header + entries, sorted by key."""
    out = bytearray()

    def write_block(contents):
        handle = _varint(len(out)) + _varint(len(contents))
        out.extend(contents)
        out.extend(b"\0" + struct.pack(
            "<I", _mask(_crc32c(_crc32c(0, contents), b"\0"))))
        return handle

    rows = [(b"", _HEADER)] + sorted(
        (key.encode(), value) for key, value in entries.items())
    data = _Block(_BLOCK_RESTART_INTERVAL)
    index = _Block(1)
    pending, last_key = None, b""
    for key, value in rows:
        if pending is not None:
            index.add(_shortest_separator(last_key, key), pending)
            pending = None
        data.add(key, value)
        last_key = key
        if data.size_estimate() >= _BLOCK_SIZE:
            pending = write_block(data.finish())
            data = _Block(_BLOCK_RESTART_INTERVAL)
    if data.buffer:
        pending = write_block(data.finish())
    metaindex = write_block(_Block(_BLOCK_RESTART_INTERVAL).finish())
    if pending is not None:
        index.add(_short_successor(last_key), pending)
    footer = metaindex + write_block(index.finish())
    out += footer + b"\0" * (_FOOTER_HANDLES - len(footer))
    out += struct.pack("<Q", _TABLE_MAGIC)
    return bytes(out)


# ---------------------------------------------------------------------------
# CRC32C.
# ---------------------------------------------------------------------------


def _mask(crc):
    """crc32c::Mask: rotate right by 15 bits and add a constant."""
    return (((crc >> 15) | (crc << 17)) + _MASK_DELTA) & 0xFFFFFFFF


def _crc32c(crc, data):
    """Extends `crc` by `data` (bytes or a contiguous uint8 array)."""
    native = _native_extend()
    if native is not None:
        if isinstance(data, np.ndarray):
            return native(crc, data.ctypes.data, data.nbytes)
        return native(crc, data, len(data))
    import google_crc32c

    return google_crc32c.extend(crc, bytes(data))


_POLY = 0x82F63B78  # CRC-32C (Castagnoli), reflected


def _multmodp(a, b):
    """a(x) * b(x) modulo the CRC polynomial, bit-reflected (as zlib)."""
    m, p = 1 << 31, 0
    while a:
        if a & m:
            p ^= b
            a ^= m
        m >>= 1
        b = (b >> 1) ^ _POLY if b & 1 else b >> 1
    return p


def _x2n_table():
    table, p = [], 1 << 30  # x^1
    for _ in range(64):
        table.append(p)
        p = _multmodp(p, p)
    return table


_X2N = _x2n_table()  # x^(2^k) modulo the polynomial, k = 0..63


def crc32c_combine(crc1, crc2, length2):
    """CRC32C of A+B from crc1 = CRC32C(A), crc2 = CRC32C(B), len(B)
    (zlib's crc32_combine, for the Castagnoli polynomial)."""
    n, k, p = int(length2), 3, 1 << 31  # x^(8 * length2), x^0 = 1
    while n:
        if n & 1:
            p = _multmodp(_X2N[k], p)
        n >>= 1
        k += 1
    return _multmodp(p, crc1) ^ crc2


@functools.cache
def _native_extend():
    """`crc32c_extend` of the library google-crc32c ships, through ctypes.

    The extension module's own `extend()` takes only `bytes` (a copy of each
    chunk) and holds the GIL; a ctypes call takes a pointer and releases it.
    None (and the slower path) where the library cannot be found.
    """
    try:
        import google_crc32c
    except ImportError:
        return None
    package = os.path.dirname(google_crc32c.__file__)
    candidates = sorted(glob.glob(package + ".libs/libcrc32c*"))
    candidates += sorted(glob.glob(os.path.join(package, "*crc32c*.so*")))
    candidates += [ctypes.util.find_library("crc32c")]
    for path in candidates:
        if not path:
            continue
        try:
            extend = ctypes.CDLL(path).crc32c_extend
        except (OSError, AttributeError):
            continue
        extend.restype = ctypes.c_uint32
        extend.argtypes = [ctypes.c_uint32, ctypes.c_void_p, ctypes.c_size_t]
        if extend(0, b"123456789", 9) == 0xE3069283:  # the check value
            return extend
    return None
