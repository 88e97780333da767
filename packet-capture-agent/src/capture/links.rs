//! The namespace's interfaces, followed on a thread of their own: every
//! interface that comes, changes or goes is passed on to the backend.

use std::collections::HashMap;
use std::io;
use std::sync::Arc;

use tokio::sync::oneshot;

use super::backend::Backend;
use crate::netlink::{LinkEvent, LinkWatcher};

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
    std::thread::Builder::new()
        .name("links".into())
        .spawn(move || run(watcher, backend.as_ref(), ready_tx))
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
        for event in events {
            match event {
                LinkEvent::Up(link) => {
                    if names.get(&link.index) != Some(&link.name) {
                        if let Some(old) = names.insert(link.index, link.name.clone()) {
                            gone(backend, &old, link.index);
                        }
                        backend.link_up(&link);
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
        backend.set_names(names.clone());
    }
}

fn gone(backend: &dyn Backend, name: &str, index: u32) {
    backend.link_gone(name, index);
    tracing::info!(iface = name, "interface gone");
}
