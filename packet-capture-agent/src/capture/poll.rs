//! Waiting on descriptors, for the backends' reader threads.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::time::Duration;

/// Waits until one of `fds` is readable or `timeout` passes. Callers read
/// without blocking afterwards, so an interrupted or failed poll only means
/// one early look.
pub fn wait_readable(fds: &[RawFd], timeout: Duration) {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|&fd| libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: a valid array of pollfd of the length given.
    unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, millis) };
}

/// An epoll set for a reader that sleeps until its ring has a batch: the
/// ring is watched edge-triggered, so a wait ends at the programs' next
/// wake-up (they send one per batch) rather than at once for any record
/// already waiting, as a level-triggered poll does; other descriptors are
/// watched level-triggered.
pub struct Waiter {
    epoll: OwnedFd,
}

impl Waiter {
    pub fn new() -> io::Result<Self> {
        // SAFETY: epoll_create1 returns a new descriptor, owned right away.
        let fd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: a fresh descriptor nobody else owns.
        Ok(Self {
            epoll: unsafe { OwnedFd::from_raw_fd(fd) },
        })
    }

    /// Watches `fd` for reading; [`Waiter::wait`] reports it as `token`
    /// (a bit).
    pub fn watch(&self, fd: RawFd, token: u64, edge_triggered: bool) -> io::Result<()> {
        let mut event = libc::epoll_event {
            events: (libc::EPOLLIN | if edge_triggered { libc::EPOLLET } else { 0 }) as u32,
            u64: token,
        };
        // SAFETY: a valid epoll descriptor and event.
        if unsafe { libc::epoll_ctl(self.epoll.as_raw_fd(), libc::EPOLL_CTL_ADD, fd, &mut event) }
            < 0
        {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// Waits until a watched descriptor is ready or `timeout` passes;
    /// the tokens of the ready ones, or'ed (0 on a timeout, or when
    /// interrupted: one early look).
    pub fn wait(&self, timeout: Duration) -> u64 {
        let mut events = [libc::epoll_event { events: 0, u64: 0 }; 4];
        let millis = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
        // SAFETY: a valid epoll descriptor and an array of the length given.
        let n = unsafe {
            libc::epoll_wait(
                self.epoll.as_raw_fd(),
                events.as_mut_ptr(),
                events.len() as i32,
                millis,
            )
        };
        events[..usize::try_from(n).unwrap_or(0)]
            .iter()
            .fold(0, |ready, e| ready | e.u64)
    }
}
