//! Shared mappings of BPF maps the agent reads or writes as memory, and of
//! files it reads whole.

use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::ptr::NonNull;

/// A shared mapping of part of a map, unmapped on drop.
pub struct Mapping {
    ptr: NonNull<u8>,
    len: usize,
}

// SAFETY: plain shared memory, which its owner reads and writes through
// atomics or alone.
unsafe impl Send for Mapping {}

impl Mapping {
    /// Maps `len` bytes of the map `fd` from `offset` with protection `prot`.
    pub fn new(
        fd: BorrowedFd<'_>,
        len: usize,
        prot: libc::c_int,
        offset: usize,
    ) -> io::Result<Self> {
        // SAFETY: a fresh shared mapping of the map's descriptor; the kernel
        // checks length, offset and protection against the map.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                prot,
                libc::MAP_SHARED,
                fd.as_raw_fd(),
                offset as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        let ptr = NonNull::new(ptr.cast()).ok_or_else(io::Error::last_os_error)?;
        Ok(Self { ptr, len })
    }

    /// The mapping as bytes, for one that nothing writes to while they are
    /// read (a file nobody else has open).
    pub fn bytes(&self) -> &[u8] {
        // SAFETY: `len` mapped bytes, readable as `new` was asked, and not
        // written meanwhile (the caller's promise).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }

    /// The address `offset` bytes in; callers keep within `len`.
    pub fn at(&self, offset: usize) -> *mut u8 {
        debug_assert!(offset < self.len);
        // SAFETY: inside the mapping, as the callers ensure.
        unsafe { self.ptr.as_ptr().add(offset) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmapping exactly what `new` mapped.
        unsafe { libc::munmap(self.ptr.as_ptr().cast(), self.len) };
    }
}
