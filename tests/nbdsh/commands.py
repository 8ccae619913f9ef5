# Every NBD command and flag Strata offers, driven through libnbd (nbdsh).
#
# Run by tests/src/nbd_clients.rs as
#   nbdsh -n -c 'rw = "nbd://…/md0"' -c 'ro = "nbd://…/ro"' -c 'disk = "nbd://…/disk"' \
#         -c 'exec(open("tests/nbdsh/commands.py").read())'
# `rw` is a read-write md export (64 MiB), `ro` a read-only export of the
# same md, `disk` a read-write export of a file (hosted) or virtio disk.
# Prints "ok" at the end; any failed assertion or unexpected error makes
# nbdsh exit non-zero.

import errno
import os

import nbd

MIB = 1 << 20
HOLE_ZERO = nbd.STATE_HOLE | nbd.STATE_ZERO


def connect(uri, strict=True, meta=True):
    h = nbd.NBD()
    if meta:
        h.add_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
    if not strict:
        # Let requests the client would refuse reach the server.
        h.set_strict_mode(0)
    # Ask for NBD_INFO_NAME and NBD_INFO_DESCRIPTION too.
    h.set_full_info(True)
    h.connect_uri(uri)
    return h


def extents(h, length, offset, flags=0):
    out = []

    def cb(context, off, entries, err):
        assert context == nbd.CONTEXT_BASE_ALLOCATION, context
        assert off == offset, (off, offset)
        out.extend(zip(entries[0::2], entries[1::2]))
        return 0

    h.block_status(length, offset, cb, flags)
    return out


def errno_of(e):
    # This binding gives the errno as its symbolic name.
    return getattr(errno, e.errno) if isinstance(e.errno, str) else e.errno


def fails(errnum, f, *args):
    try:
        f(*args)
    except nbd.Error as e:
        assert errno_of(e) == errnum, "%s%r: errno %s, wanted %s (%s)" % (
            f.__name__, args[1:], e.errno, errno.errorcode[errnum], e.string)
        return
    raise AssertionError("%s%r succeeded, wanted errno %d" % (f.__name__, args[1:], errnum))


# ---- negotiation: every flag true of a read-write md export ----
h = connect(rw)
size = h.get_size()
assert size == 64 * MIB, size
assert h.get_structured_replies_negotiated()
assert h.can_meta_context(nbd.CONTEXT_BASE_ALLOCATION)
for name in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero",
             "can_df", "can_cache", "can_multi_conn"):
    assert getattr(h, name)(), name
assert not h.is_read_only()
assert h.get_block_size(nbd.SIZE_MINIMUM) == 512
assert h.get_block_size(nbd.SIZE_PREFERRED) == 4096
assert h.get_block_size(nbd.SIZE_MAXIMUM) == 32 * MIB
assert h.get_canonical_export_name() == rw.rsplit("/", 1)[1]
assert h.get_export_description() == "md0 (md)", h.get_export_description()

# ---- block status on an untouched md: one hole ----
assert extents(h, size, 0) == [(size, HOLE_ZERO)], extents(h, size, 0)

# ---- writes and reads, with and without FUA, structured and DF ----
data = os.urandom(256 * 1024)
h.pwrite(data[:128 * 1024], 0)
h.pwrite(data[128 * 1024:], 128 * 1024, nbd.CMD_FLAG_FUA)
assert h.pread(len(data), 0) == data
chunks = []


def chunk(buf, offset, status, err):
    chunks.append((offset, len(buf), status))
    return 0


buf = h.pread_structured(65536, 4096, chunk, nbd.CMD_FLAG_DF)
assert buf == data[4096:4096 + 65536]
assert chunks == [(4096, 65536, nbd.READ_DATA)], chunks
h.flush()
h.cache(MIB, 0)
h.cache(4096, size - 4096)

# ---- trim and zero, then block status ----
h.trim(64 * 1024, 0)
h.trim(64 * 1024, 64 * 1024, nbd.CMD_FLAG_FUA)
assert h.pread(128 * 1024, 0) == bytes(128 * 1024), "trimmed md reads zeroes"
h.zero(64 * 1024, 128 * 1024)                           # may punch a hole
h.zero(32 * 1024, 192 * 1024, nbd.CMD_FLAG_NO_HOLE)     # must stay allocated
h.zero(4096, 8 * MIB, nbd.CMD_FLAG_FAST_ZERO)
h.zero(4096, 8 * MIB + 4096, nbd.CMD_FLAG_FUA)
fails(errno.ENOTSUP, h.zero, 4096, 0, nbd.CMD_FLAG_FAST_ZERO | nbd.CMD_FLAG_NO_HOLE)
assert h.pread(256 * 1024, 0)[:224 * 1024] == bytes(224 * 1024)
assert h.pread(32 * 1024, 224 * 1024) == data[224 * 1024:]
got = extents(h, MIB, 0)
want = [(192 * 1024, HOLE_ZERO), (64 * 1024, 0), (MIB - 256 * 1024, HOLE_ZERO)]
assert got == want, got
assert extents(h, MIB, 0, nbd.CMD_FLAG_REQ_ONE) == [(192 * 1024, HOLE_ZERO)]
assert extents(h, 4096, 200 * 1024, nbd.CMD_FLAG_REQ_ONE) == [(4096, 0)]

# ---- multi-conn: a second connection sees the first one's writes ----
h2 = connect(rw, meta=False)
more = os.urandom(8192)
h.pwrite(more, 4 * MIB)
h2.flush()
assert h2.pread(8192, 4 * MIB) == more
h2.shutdown()

# ---- errors, with the client's own checks off ----
e = connect(rw, strict=False)
fails(errno.EINVAL, e.pread, 512, size)                 # past the end
fails(errno.EINVAL, e.pread, 1024, size - 512)
fails(errno.ENOSPC, e.pwrite, b"\1" * 1024, size - 512)
fails(errno.EINVAL, e.pread, 512, 100)                  # not aligned
fails(errno.EINVAL, e.pwrite, b"\1" * 100, 0)
fails(errno.EINVAL, e.trim, 512, size)
fails(errno.ENOSPC, e.zero, 1024, size - 512)
fails(errno.EINVAL, e.cache, 512, size)
fails(errno.EOVERFLOW, e.pread, 33 * MIB, 0)            # over the maximum payload
fails(errno.EINVAL, e.pread, 512, 0, 1 << 7)            # unknown command flag
fails(errno.EINVAL, e.flush, nbd.CMD_FLAG_NO_HOLE)      # flag not for this command
fails(errno.EINVAL, e.trim, 512, 0, nbd.CMD_FLAG_DF)
try:
    e.block_status(512, size, lambda *a: 0)
    raise AssertionError("block status past the end succeeded")
except nbd.Error as x:
    assert errno_of(x) == errno.EINVAL, x.errno
# The session goes on after errors.
assert e.pread(512, 0) == bytes(512)
e.shutdown()

# Block status without a selected context is refused.
n = connect(rw, strict=False, meta=False)
try:
    n.block_status(512, 0, lambda *a: 0)
    raise AssertionError("block status without a context succeeded")
except nbd.Error:
    pass
n.shutdown()

# ---- a read-only export ----
r = connect(ro, strict=False)
assert r.is_read_only()
for name in ("can_flush", "can_fua", "can_trim", "can_zero", "can_fast_zero"):
    assert not getattr(r, name)(), name
assert r.can_df() and r.can_cache() and r.can_multi_conn()
assert r.pread(8192, 4 * MIB) == more
fails(errno.EPERM, r.pwrite, b"\1" * 512, 0)
fails(errno.EPERM, r.trim, 512, 0)
fails(errno.EPERM, r.zero, 512, 0)
r.cache(4096, 0)
assert extents(r, 4096, 4 * MIB) == [(4096, 0)]
r.shutdown()

# ---- a file or virtio disk export ----
d = connect(disk)
dsize = d.get_size()
blob = os.urandom(192 * 1024)
d.pwrite(blob, MIB, nbd.CMD_FLAG_FUA)
d.flush()
assert d.pread_structured(len(blob), MIB, lambda *a: 0, nbd.CMD_FLAG_DF) == blob
d.trim(64 * 1024, MIB)
d.zero(64 * 1024, MIB + 64 * 1024)
d.zero(64 * 1024, MIB + 128 * 1024, nbd.CMD_FLAG_NO_HOLE)
assert d.pread(len(blob), MIB) == bytes(len(blob))
total = sum(length for length, _ in extents(d, dsize, 0))
assert 0 < total <= dsize
for length, flags in extents(d, 192 * 1024, MIB):
    assert flags & ~HOLE_ZERO == 0 and length % 512 == 0
d.shutdown()

h.shutdown()
print("ok")
