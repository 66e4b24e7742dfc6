//! Batched writes to hash maps (`BPF_MAP_UPDATE_BATCH`, `BPF_MAP_DELETE_BATCH`) through the raw
//! `bpf` system call: a 16k-entry policy diff is one system call per map instead of one per
//! entry. Shared by the kernel backends (aya has no batch API; libbpf-rs's delete does not say
//! how far it got, which a delete that tolerates missing keys needs).

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, BorrowedFd};

/// `enum bpf_cmd` values.
const BPF_MAP_UPDATE_BATCH: libc::c_long = 26;
const BPF_MAP_DELETE_BATCH: libc::c_long = 27;

/// The `batch` member of `union bpf_attr`.
#[repr(C)]
#[derive(Default)]
struct BatchAttr {
    in_batch: u64,
    out_batch: u64,
    keys: u64,
    values: u64,
    count: u32,
    map_fd: u32,
    elem_flags: u64,
    flags: u64,
}

/// Runs one batch command; returns how many elements the kernel processed, and its error.
fn batch(
    cmd: libc::c_long,
    fd: BorrowedFd<'_>,
    keys: *const u8,
    values: *const u8,
    count: usize,
) -> (usize, io::Result<()>) {
    let Ok(count32) = u32::try_from(count) else {
        return (0, Err(io::Error::from(io::ErrorKind::InvalidInput)));
    };
    let Ok(map_fd) = u32::try_from(fd.as_raw_fd()) else {
        return (0, Err(io::Error::from(io::ErrorKind::InvalidInput)));
    };
    let mut attr = BatchAttr {
        keys: keys as u64,
        values: values as u64,
        count: count32,
        map_fd,
        ..BatchAttr::default()
    };
    // SAFETY: `attr` is a valid, writable `bpf_attr` prefix of the size passed (the kernel
    // zero-checks the rest of the union only up to that size); the caller guarantees that
    // `keys` (and `values` for updates) point at `count` elements of the map's key (value) size.
    let r = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            &raw mut attr,
            size_of::<BatchAttr>() as libc::c_uint,
        )
    };
    // The kernel writes back how many elements it got through, on success and on failure.
    let done = (attr.count as usize).min(count);
    if r < 0 {
        (done, Err(io::Error::last_os_error()))
    } else {
        (count, Ok(()))
    }
}

/// Writes `keys[i] → values[i]` (flag `BPF_ANY`) in one system call.
///
/// # Safety
/// `K` and `V` must be exactly the map's key and value types: plain data, `size_of` equal to the
/// map's key and value sizes (the kernel reads that many bytes per element).
pub unsafe fn update_batch<K: Copy, V: Copy>(
    fd: BorrowedFd<'_>,
    keys: &[K],
    values: &[V],
) -> io::Result<()> {
    if keys.len() != values.len() {
        return Err(io::Error::from(io::ErrorKind::InvalidInput));
    }
    if keys.is_empty() {
        return Ok(());
    }
    batch(
        BPF_MAP_UPDATE_BATCH,
        fd,
        keys.as_ptr().cast(),
        values.as_ptr().cast(),
        keys.len(),
    )
    .1
}

/// Deletes `keys`, skipping the ones that are not in the map, in as few system calls as there
/// are missing keys (plus one). Returns how many were deleted.
///
/// # Safety
/// `K` must be exactly the map's key type (see [`update_batch`]).
pub unsafe fn delete_batch<K: Copy>(fd: BorrowedFd<'_>, keys: &[K]) -> io::Result<usize> {
    let mut rest = keys;
    let mut deleted = 0;
    while !rest.is_empty() {
        let (done, r) = batch(
            BPF_MAP_DELETE_BATCH,
            fd,
            rest.as_ptr().cast(),
            std::ptr::null(),
            rest.len(),
        );
        deleted += done;
        match r {
            Ok(()) => break,
            // The key at `done` is missing: step over it and carry on.
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => {
                rest = rest.get(done + 1..).unwrap_or_default();
            }
            Err(e) => return Err(e),
        }
    }
    Ok(deleted)
}
