//! Waiting for a file to go, on the kernel's word (inotify) rather than by
//! looking again and again.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A watch on the directory of one file, for its removal (deleted, or
/// renamed away). Made before whatever removes the file starts, so that no
/// removal falls between a look and the watch.
pub struct Removal {
    inotify: OwnedFd,
    path: PathBuf,
}

impl Removal {
    pub fn watch(path: &Path) -> io::Result<Self> {
        // SAFETY: inotify_init1 takes flags only; its result is checked
        // before it is owned.
        let fd = unsafe { libc::inotify_init1(libc::IN_CLOEXEC | libc::IN_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: `fd` is a new descriptor nothing else owns.
        let inotify = unsafe { OwnedFd::from_raw_fd(fd) };
        let dir = path.parent().unwrap_or(Path::new("."));
        let dir =
            std::ffi::CString::new(dir.as_os_str().as_encoded_bytes()).map_err(io::Error::other)?;
        // SAFETY: `dir` is a NUL-terminated path that outlives the call.
        let watch = unsafe {
            libc::inotify_add_watch(
                inotify.as_raw_fd(),
                dir.as_ptr(),
                libc::IN_DELETE | libc::IN_MOVED_FROM,
            )
        };
        if watch < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            inotify,
            path: path.to_owned(),
        })
    }

    /// Whether the file is gone within `within`: looked at once, then
    /// again after each removal or rename in its directory.
    pub fn within(&self, within: Duration) -> io::Result<bool> {
        let deadline = Instant::now() + within;
        let mut events = [0u8; 4096];
        loop {
            if !self.path.try_exists()? {
                return Ok(true);
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Ok(false);
            }
            let mut ready = libc::pollfd {
                fd: self.inotify.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            let millis = libc::c_int::try_from(left.as_millis().max(1)).unwrap_or(libc::c_int::MAX);
            // SAFETY: one pollfd, valid for the call.
            if unsafe { libc::poll(&mut ready, 1, millis) } < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            // The events say only that something in the directory went;
            // the look above says whether it was this file.
            // SAFETY: `events` is writable for its whole length.
            let read = unsafe {
                libc::read(
                    self.inotify.as_raw_fd(),
                    events.as_mut_ptr().cast(),
                    events.len(),
                )
            };
            if read < 0 {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::WouldBlock {
                    return Err(e);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_removal_is_seen_and_its_absence_told() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("a.pcap");
        std::fs::write(&file, b"x").unwrap();
        let removal = Removal::watch(&file).unwrap();
        assert!(!removal.within(Duration::from_millis(50)).unwrap());
        let remover = std::thread::spawn({
            let file = file.clone();
            move || std::fs::rename(&file, file.with_extension("gz")).unwrap()
        });
        assert!(removal.within(Duration::from_secs(10)).unwrap());
        remover.join().unwrap();
    }
}
