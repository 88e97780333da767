//! Starting, recognising and stopping the cluster's processes.
//!
//! A process of a [`Lifetime::Process`] cluster gets `PR_SET_PDEATHSIG`, so
//! the kernel kills it when the harness dies, however it dies, and a process
//! group of its own, so that a Ctrl-C meant for the harness does not reach
//! it. The signal follows the *thread* that forked, so every such process
//! is forked by one thread that lives as long as the process. A
//! [`Lifetime::Detached`] process starts its own session and outlives the
//! command that started it.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::mpsc;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{Error, Lifetime, Result};

/// A process recorded in the state file: the start time (in clock ticks
/// since boot) tells it from a later process that reuses the pid.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq, Eq)]
pub struct Proc {
    pub role: String,
    pub pid: u32,
    pub start: u64,
}

impl Proc {
    pub fn of(role: &str, child: &Child) -> Self {
        let pid = child.id();
        Self {
            role: role.to_string(),
            pid,
            start: start_time(pid).unwrap_or_default(),
        }
    }

    /// Whether this very process still runs (a zombie does not).
    pub fn alive(&self) -> bool {
        stat(self.pid)
            .is_some_and(|(state, start)| start == self.start && !matches!(state, 'Z' | 'X'))
    }

    /// SIGTERM, then SIGKILL after `grace`; returns when it is gone (or
    /// after a few more seconds if even SIGKILL does not end it).
    pub fn stop(&self, grace: Duration) {
        let Some(pidfd) = self.pidfd() else {
            return;
        };
        if !grace.is_zero() {
            signal(self.pid, libc::SIGTERM);
            if wait_readable(&pidfd, grace) {
                return;
            }
        }
        signal(self.pid, libc::SIGKILL);
        wait_readable(&pidfd, Duration::from_secs(5));
    }

    /// A pidfd for the process, if it is the recorded one.
    fn pidfd(&self) -> Option<OwnedFd> {
        // SAFETY: pidfd_open takes a pid and flags and returns a new fd or -1.
        let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, self.pid, 0) };
        if fd < 0 {
            return None;
        }
        // SAFETY: the kernel just returned this fd to us.
        let fd = unsafe { OwnedFd::from_raw_fd(fd as i32) };
        // Checked after opening: a pidfd names one process for good.
        (start_time(self.pid) == Some(self.start)).then_some(fd)
    }
}

fn signal(pid: u32, sig: i32) {
    // SAFETY: kill has no memory effects; a stale pid is ruled out by the
    // caller's start-time check.
    unsafe { libc::kill(pid as i32, sig) };
}

/// Waits until a pidfd becomes readable (the process exited).
fn wait_readable(fd: &OwnedFd, timeout: Duration) -> bool {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = i32::try_from(timeout.as_millis()).unwrap_or(i32::MAX);
    // SAFETY: one valid pollfd.
    unsafe { libc::poll(&mut pfd, 1, ms) > 0 }
}

/// Field 22 of /proc/<pid>/stat: when the process started.
pub fn start_time(pid: u32) -> Option<u64> {
    stat(pid).map(|(_, start)| start)
}

/// The state letter (field 3) and start time (field 22) of a process.
fn stat(pid: u32) -> Option<(char, u64)> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces; it ends at the last ')'.
    let mut fields = stat[stat.rfind(')')? + 1..].split_whitespace();
    let state = fields.next()?.chars().next()?;
    let start = fields.nth(18)?.parse().ok()?;
    Some((state, start))
}

/// How to start one process.
pub struct Spawn<'a> {
    pub cmd: Command,
    pub lifetime: Lifetime,
    /// Network namespace to run in (`/run/netns/<name>`).
    pub netns: Option<&'a str>,
    /// stdout, and stderr unless piped, go to this file.
    pub log: &'a Path,
    pub pipe_stderr: bool,
}

impl Spawn<'_> {
    pub fn start(self) -> Result<Child> {
        let program = self.cmd.get_program().to_string_lossy().into_owned();
        let log = OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log)
            .map_err(|e| Error::io(self.log, e))?;
        let stderr = if self.pipe_stderr {
            Stdio::piped()
        } else {
            log.try_clone().map_err(|e| Error::io(self.log, e))?.into()
        };
        let netns = match self.netns {
            Some(name) => {
                let path = format!("/run/netns/{name}");
                Some(File::open(&path).map_err(|e| Error::io(&path, e))?)
            }
            None => None,
        };
        let mut cmd = self.cmd;
        cmd.stdin(Stdio::null()).stdout(log).stderr(stderr);
        let lifetime = self.lifetime;
        let netns_fd = netns.as_ref().map(AsRawFd::as_raw_fd);
        // SAFETY: the closure only makes async-signal-safe system calls.
        unsafe {
            cmd.pre_exec(move || {
                match lifetime {
                    Lifetime::Process => {
                        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                        // Its own process group: a Ctrl-C in the terminal
                        // reaches the owner, which tears the cluster down in
                        // order, not etcd and the apiserver under it.
                        if libc::setpgid(0, 0) != 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                    Lifetime::Detached => {
                        if libc::setsid() < 0 {
                            return Err(std::io::Error::last_os_error());
                        }
                    }
                }
                if let Some(fd) = netns_fd
                    && libc::setns(fd, libc::CLONE_NEWNET) != 0
                {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let child = match lifetime {
            Lifetime::Process => on_keeper_thread(move || cmd.spawn()),
            Lifetime::Detached => cmd.spawn(),
        };
        drop(netns);
        child.map_err(|e| Error::Process(format!("starting {program}: {e}")))
    }
}

type Job = Box<dyn FnOnce() + Send>;

/// Runs `f` on the thread that forks every process of a process-lifetime
/// cluster; that thread never exits, so their parent-death signal fires
/// only when the whole process ends.
fn on_keeper_thread<T: Send + 'static>(f: impl FnOnce() -> T + Send + 'static) -> T {
    static KEEPER: OnceLock<mpsc::Sender<Job>> = OnceLock::new();
    let keeper = KEEPER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("cluster-process-keeper".into())
            .spawn(move || {
                for job in rx {
                    job();
                }
            })
            .expect("spawning the process keeper thread");
        tx
    });
    let (tx, rx) = mpsc::channel();
    keeper
        .send(Box::new(move || {
            let _ = tx.send(f());
        }))
        .expect("the process keeper thread runs for the life of the process");
    rx.recv()
        .expect("the process keeper thread answers every job")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_start_time_is_readable_and_stable() {
        let me = std::process::id();
        let a = start_time(me).expect("own stat");
        assert_eq!(start_time(me), Some(a));
        assert_eq!(start_time(u32::MAX), None);
    }
}
