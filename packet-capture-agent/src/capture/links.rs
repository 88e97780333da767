//! The namespace's interfaces, followed on a thread of their own: every
//! interface that comes, changes or goes is passed on to the backend.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::backend::Backend;
use crate::netlink::{LinkEvent, LinkWatcher};
use crate::sync::spawn_essential;

#[derive(Debug, thiserror::Error)]
pub enum LinksError {
    #[error("subscribing to interface changes: {0}")]
    Subscribe(#[source] io::Error),
    #[error("starting the interface thread: {0}")]
    Thread(#[source] io::Error),
    #[error("listing the network interfaces: {0}")]
    Listing(#[source] io::Error),
}

/// Starts following the interfaces and returns once every interface that
/// exists now has been handed to the backend.
pub async fn follow(backend: Arc<dyn Backend>) -> Result<(), LinksError> {
    let watcher = LinkWatcher::new().map_err(LinksError::Subscribe)?;
    let (ready_tx, ready_rx) = oneshot::channel();
    spawn_essential("links".into(), move || {
        run(watcher, backend.as_ref(), ready_tx)
    })
    .map_err(LinksError::Thread)?;
    match ready_rx.await {
        Ok(result) => result.map_err(LinksError::Listing),
        Err(_) => Err(LinksError::Listing(io::Error::other(
            "the interface thread stopped",
        ))),
    }
}

/// Reads link events until the socket fails; `ready` hears once the first
/// listing is complete, or why it could not be.
fn run(mut watcher: LinkWatcher, backend: &dyn Backend, ready: oneshot::Sender<io::Result<()>>) {
    // The name each index had when last seen: rtnetlink repeats news of
    // interfaces already known, and a rename or a new interface under an
    // old index is a change.
    let mut names: HashMap<u32, String> = HashMap::new();
    let mut ready = Some(ready);
    loop {
        let events = match watcher.next_events() {
            Ok(e) => e,
            Err(e) => {
                tracing::error!(error = %e, "reading interface changes stopped");
                if let Some(tx) = ready.take() {
                    let _ = tx.send(Err(e));
                }
                return;
            }
        };
        let mut up = Vec::new();
        for event in events {
            match event {
                LinkEvent::Up(link) => {
                    if names.get(&link.index) != Some(&link.name) {
                        if let Some(old) = names.insert(link.index, link.name.clone()) {
                            gone(backend, &old, link.index);
                        }
                        up.push(link);
                    }
                }
                LinkEvent::Gone(link) => {
                    names.remove(&link.index);
                    gone(backend, &link.name, link.index);
                }
                LinkEvent::DumpDone => {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(Ok(()));
                    }
                }
            }
        }
        // The names first: a file's interface block names the interface of
        // its first packet once, and for good.
        backend.set_names(names.clone());
        for link in &up {
            backend.link_up(link);
        }
    }
}

fn gone(backend: &dyn Backend, name: &str, index: u32) {
    backend.link_gone(name, index);
    tracing::info!(iface = name, "interface gone");
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;
    use std::os::fd::AsRawFd as _;
    use std::process::{Command, Stdio};
    use std::sync::{Condvar, Mutex};
    use std::time::{Duration, Instant};

    use packet_capture_test_support::{Netns, privileged};

    use super::*;
    use crate::capture::backend::{BackendError, Running, Selection};
    use crate::capture::sink::Sink;
    use crate::netlink::Link;

    /// What the backend was told, as the engine's backends would hear it.
    #[derive(Default)]
    struct Told {
        /// Interfaces by index, as link_up and link_gone left them.
        links: BTreeMap<u32, String>,
        /// Every call in order: `+name` for link_up, `-name` for link_gone.
        calls: Vec<String>,
        /// What set_names gave last.
        names: HashMap<u32, String>,
    }

    #[derive(Default)]
    struct Recorder {
        told: Mutex<Told>,
        changed: Condvar,
    }

    impl Recorder {
        /// Waits until `done` holds for what the backend was told.
        fn wait(&self, what: &str, done: impl Fn(&Told) -> bool) {
            let deadline = Instant::now() + Duration::from_secs(20);
            let mut told = self.told.lock().unwrap();
            while !done(&told) {
                let left = deadline
                    .checked_duration_since(Instant::now())
                    .unwrap_or_else(|| {
                        panic!("{what}: told {:?}, calls {:?}", told.links, told.calls)
                    });
                told = self.changed.wait_timeout(told, left).unwrap().0;
            }
        }

        fn calls_after(&self, n: usize) -> Vec<String> {
            self.told.lock().unwrap().calls[n..].to_vec()
        }
    }

    impl Backend for Recorder {
        fn name(&self) -> &'static str {
            "recorder"
        }

        fn interfaces(&self) -> Vec<String> {
            self.told.lock().unwrap().links.values().cloned().collect()
        }

        fn link_up(&self, link: &Link) {
            let mut told = self.told.lock().unwrap();
            told.links.insert(link.index, link.name.clone());
            // Its packets' files must be able to name it.
            let named = told.names.get(&link.index) == Some(&link.name);
            let call = if named { "+" } else { "+unnamed " };
            told.calls.push(format!("{call}{}", link.name));
            self.changed.notify_all();
        }

        fn link_gone(&self, name: &str, index: u32) {
            let mut told = self.told.lock().unwrap();
            if told.links.get(&index).is_some_and(|n| n == name) {
                told.links.remove(&index);
            }
            told.calls.push(format!("-{name}"));
            self.changed.notify_all();
        }

        fn set_names(&self, names: HashMap<u32, String>) {
            self.told.lock().unwrap().names = names;
        }

        fn add(
            &self,
            _id: &str,
            _selection: &Selection,
            _sink: Sink,
        ) -> Result<Box<dyn Running>, BackendError> {
            Err(BackendError::Full(0))
        }

        fn shutdown(&self) {}
    }

    /// The namespace's interfaces as glibc lists them (the calling thread's
    /// namespace), by index.
    fn actual() -> BTreeMap<u32, String> {
        // SAFETY: if_nameindex returns an array ended by a zero entry, or
        // null; it is freed once read.
        unsafe {
            let list = libc::if_nameindex();
            assert!(!list.is_null(), "{}", io::Error::last_os_error());
            let mut out = BTreeMap::new();
            let mut at = list;
            while (*at).if_index != 0 {
                let name = std::ffi::CStr::from_ptr((*at).if_name);
                out.insert((*at).if_index, name.to_string_lossy().into_owned());
                at = at.add(1);
            }
            libc::if_freenameindex(list);
            out
        }
    }

    /// Runs `commands` through one `ip -batch` in `ns`, as fast as iproute2
    /// goes.
    fn ip_batch(ns: &Netns, commands: &[String]) {
        use std::io::Write as _;
        let mut child = Command::new("ip")
            .args(["-n", ns.name(), "-batch", "-"])
            .stdin(Stdio::piped())
            .spawn()
            .unwrap();
        child
            .stdin
            .take()
            .unwrap()
            .write_all(commands.join("\n").as_bytes())
            .unwrap();
        assert!(child.wait().unwrap().success(), "ip -batch failed");
    }

    #[test]
    fn new_renamed_moved_and_deleted_interfaces_reach_the_backend() {
        if !privileged("new_renamed_moved_and_deleted_interfaces_reach_the_backend") {
            return;
        }
        let ns = Netns::new("lkw");
        let elsewhere = Netns::new("lkx");
        ns.enter();
        let backend = Arc::new(Recorder::default());
        let rt = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        // The links thread starts in this thread's namespace.
        rt.block_on(follow(backend.clone())).unwrap();
        assert_eq!(backend.interfaces(), ["lo"]);

        ns.ip(&["link", "add", "lka", "type", "veth", "peer", "name", "lkb"]);
        backend.wait("new pair", |t| {
            t.calls.contains(&"+lka".into()) && t.calls.contains(&"+lkb".into())
        });

        // A rename: the old name goes, then the new one comes.
        let n = backend.told.lock().unwrap().calls.len();
        ns.ip(&["link", "set", "lka", "name", "lkc"]);
        backend.wait("rename", |t| t.calls.len() >= n + 2);
        assert_eq!(backend.calls_after(n), ["-lka", "+lkc"]);

        // A move to another namespace is a departure.
        let n = backend.told.lock().unwrap().calls.len();
        ns.ip(&["link", "set", "lkb", "netns", elsewhere.name()]);
        backend.wait("move", |t| t.calls.len() > n);
        assert_eq!(backend.calls_after(n), ["-lkb"]);

        let n = backend.told.lock().unwrap().calls.len();
        ns.ip(&["link", "del", "lkc"]);
        backend.wait("delete", |t| t.calls.len() > n);
        assert_eq!(backend.calls_after(n), ["-lkc"]);
        assert_eq!(backend.interfaces(), ["lo"]);
    }

    /// Bursts of interfaces created, renamed, moved away and deleted, read
    /// through a receive buffer too small for them: the kernel drops
    /// notifications, and the backend still ends up told exactly the
    /// interfaces that exist.
    #[test]
    fn churn_leaves_the_backend_with_the_interfaces_that_exist() {
        if !privileged("churn_leaves_the_backend_with_the_interfaces_that_exist") {
            return;
        }
        let ns = Netns::new("lkw");
        let elsewhere = Netns::new("lkx");
        ns.enter();
        let watcher = LinkWatcher::new().unwrap();
        // The smallest buffer the kernel allows: a burst overflows it.
        let small: libc::c_int = 1;
        // SAFETY: setsockopt on our socket with an int of the size given.
        let rc = unsafe {
            libc::setsockopt(
                watcher.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUF,
                (&raw const small).cast(),
                size_of::<libc::c_int>() as u32,
            )
        };
        assert_eq!(rc, 0, "{}", io::Error::last_os_error());
        let backend = Arc::new(Recorder::default());
        let (ready_tx, ready_rx) = oneshot::channel();
        let thread_backend = backend.clone();
        std::thread::spawn(move || run(watcher, thread_backend.as_ref(), ready_tx));
        ready_rx.blocking_recv().unwrap().unwrap();

        for round in 0..4 {
            let mut commands = Vec::new();
            for i in 0..40 {
                commands.push(format!(
                    "link add c{round}x{i} type veth peer name p{round}x{i}"
                ));
            }
            for i in 0..40 {
                match i % 4 {
                    0 => commands.push(format!("link set c{round}x{i} name r{round}x{i}")),
                    1 => commands.push(format!("link set p{round}x{i} netns {}", elsewhere.name())),
                    2 => commands.push(format!("link del c{round}x{i}")),
                    _ => {}
                }
            }
            ip_batch(&ns, &commands);
            let want = actual();
            backend.wait(&format!("round {round}"), |t| t.links == want);
        }
        // And when they all go (deleting one end of a pair takes the other).
        let commands: Vec<String> = actual()
            .into_values()
            .filter(|name| name.starts_with(['c', 'r']))
            .map(|name| format!("link del {name}"))
            .collect();
        ip_batch(&ns, &commands);
        backend.wait("all deleted", |t| {
            t.links.values().map(String::as_str).collect::<Vec<_>>() == ["lo"]
        });
    }
}
