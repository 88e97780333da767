//! Mutexes for code that runs on the agent's threads and tasks.

use std::sync::{Mutex, MutexGuard, PoisonError};

/// Locks `mutex`, also when a thread panicked while holding it. What the
/// agent's mutexes guard is whole between statements (maps, queues, a
/// handle), so the data is still sound; taking it keeps one failed request
/// or thread from failing every later caller of the same lock.
pub fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// How the agent exits when one of its essential threads panicked.
pub const PANIC_EXIT_CODE: i32 = 70;

/// Starts a thread the agent cannot work without (the ring reader, the
/// link watcher, a libpcap capture). If it panics the whole process exits
/// with [`PANIC_EXIT_CODE`]: a dead reader would otherwise leave `/health`
/// answering ok while nothing is captured. A restarted agent is what the
/// kubelet and the controller already handle (the node's capture fails
/// with a message).
pub fn spawn_essential<T: Send + 'static>(
    name: String,
    f: impl FnOnce() -> T + Send + 'static,
) -> std::io::Result<std::thread::JoinHandle<T>> {
    std::thread::Builder::new()
        .name(name.clone())
        .spawn(
            move || match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
                Ok(value) => value,
                Err(payload) => {
                    let what = payload
                        .downcast_ref::<&str>()
                        .map(|s| s.to_string())
                        .or_else(|| payload.downcast_ref::<String>().cloned())
                        .unwrap_or_default();
                    tracing::error!(
                        "thread {name} panicked ({what}); the agent exits so that it is restarted"
                    );
                    packet_capture_common::logging::flush();
                    std::process::exit(PANIC_EXIT_CODE);
                }
            },
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Run again as a child process (the exit would end the test runner):
    /// the child's essential thread panics, and the child must exit with
    /// the code, not go on.
    #[test]
    fn a_panicking_essential_thread_ends_the_process() {
        const CHILD: &str = "PACKET_CAPTURE_ESSENTIAL_PANIC_CHILD";
        if std::env::var_os(CHILD).is_some() {
            let thread = spawn_essential("doomed".into(), || panic!("on purpose")).unwrap();
            let _ = thread.join();
            std::process::exit(0);
        }
        let out = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "sync::tests::a_panicking_essential_thread_ends_the_process",
                "--nocapture",
            ])
            .env(CHILD, "1")
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(PANIC_EXIT_CODE), "{stderr}");
        assert!(stderr.contains("on purpose"), "{stderr}");
    }

    #[test]
    fn an_essential_thread_returns_its_value() {
        let thread = spawn_essential("fine".into(), || 42).unwrap();
        assert_eq!(thread.join().unwrap(), 42);
    }
}
