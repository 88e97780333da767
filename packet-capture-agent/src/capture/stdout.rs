//! `PACKET:` lines on the agent's standard output, written by a thread of
//! their own.
//!
//! The log pipe belongs to the container runtime. When it stops reading,
//! a write blocks; a sink that wrote its lines itself would then stall the
//! thread that reads the ring, and with it every capture on the node. So a
//! sink hands its lines over, at most [`QUEUE_BYTES`] of them wait, and the
//! packets whose lines do not fit are dropped and counted.

use std::io::Write;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Receiver, Sender, SyncSender};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use super::sink::Counters;

/// The most bytes of lines waiting for the standard output, all captures
/// together.
pub const QUEUE_BYTES: usize = 8 << 20;

/// A handle on the thread that writes lines.
#[derive(Clone)]
pub struct Lines {
    to_writer: Sender<Chunk>,
    /// Bytes queued that the writer has not taken yet.
    queued: Arc<AtomicUsize>,
    limit: usize,
    /// Set while lines are refused, so that it is said once each time.
    refusing: Arc<AtomicBool>,
    /// Set when a wait for the lines ran out, until the writer has taken
    /// every chunk queued: captures ending meanwhile (all of them, at
    /// shutdown) do not wait each in turn for an output read slowly or
    /// not at all.
    stalled: Arc<AtomicBool>,
}

enum Chunk {
    Lines {
        bytes: Vec<u8>,
        /// The packets `bytes` holds, counted as dropped if the write fails.
        packets: u64,
        counters: Arc<Counters>,
    },
    /// Answered once everything queued before it is written.
    Barrier(SyncSender<()>),
}

impl Lines {
    /// The agent's standard output: one writer for the process.
    pub fn stdout() -> Self {
        static STDOUT: OnceLock<Lines> = OnceLock::new();
        STDOUT
            .get_or_init(|| Self::spawn(std::io::stdout(), QUEUE_BYTES))
            .clone()
    }

    /// Starts a thread that writes to `out`, holding at most `limit` bytes.
    pub fn spawn(out: impl Write + Send + 'static, limit: usize) -> Self {
        let (to_writer, chunks) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let stalled = Arc::new(AtomicBool::new(false));
        let (written, unstalled) = (queued.clone(), stalled.clone());
        std::thread::Builder::new()
            .name("stdout-lines".into())
            .spawn(move || write_lines(out, chunks, &written, &unstalled))
            .expect("spawning the thread that writes PACKET: lines");
        Self {
            to_writer,
            queued,
            limit,
            refusing: Arc::new(AtomicBool::new(false)),
            stalled,
        }
    }

    /// Queues `bytes`, the lines of `packets` packets of one capture; gives
    /// them back when they do not fit.
    pub fn send(
        &self,
        bytes: Vec<u8>,
        packets: u64,
        counters: &Arc<Counters>,
    ) -> Result<(), Vec<u8>> {
        let len = bytes.len();
        if self.queued.load(Ordering::Relaxed) + len > self.limit {
            if !self.refusing.swap(true, Ordering::Relaxed) {
                tracing::warn!(
                    "the standard output is not being read ({} bytes of PACKET: lines wait): \
                     the packets of further lines are dropped, and counted so",
                    self.limit
                );
            }
            return Err(bytes);
        }
        self.refusing.store(false, Ordering::Relaxed);
        self.queued.fetch_add(len, Ordering::Relaxed);
        let chunk = Chunk::Lines {
            bytes,
            packets,
            counters: counters.clone(),
        };
        // The writer is gone (it panicked): nothing it is given is written.
        if let Err(mpsc::SendError(Chunk::Lines { bytes, .. })) = self.to_writer.send(chunk) {
            self.queued.fetch_sub(len, Ordering::Relaxed);
            return Err(bytes);
        }
        Ok(())
    }

    /// Waits, at most `wait` (not at all while the output is stalled),
    /// until what was queued before is written; returns whether it was.
    pub fn written(&self, wait: Duration) -> bool {
        if self.stalled.load(Ordering::Relaxed) {
            return false;
        }
        let (done, barrier) = mpsc::sync_channel(1);
        let written =
            self.to_writer.send(Chunk::Barrier(done)).is_ok() && barrier.recv_timeout(wait).is_ok();
        if !written {
            self.stalled.store(true, Ordering::Relaxed);
        }
        written
    }
}

fn write_lines(
    mut out: impl Write,
    chunks: Receiver<Chunk>,
    queued: &AtomicUsize,
    stalled: &AtomicBool,
) {
    let mut failed = false;
    for chunk in chunks {
        match chunk {
            Chunk::Lines {
                bytes,
                packets,
                counters,
            } => {
                // Taken: the queue has room for as much again.
                if queued.fetch_sub(bytes.len(), Ordering::Relaxed) == bytes.len() {
                    stalled.store(false, Ordering::Relaxed);
                }
                if let Err(e) = out.write_all(&bytes).and_then(|()| out.flush()) {
                    // Counted as logged when queued: they are lost instead.
                    counters.packets.fetch_sub(packets, Ordering::Relaxed);
                    counters.dropped.fetch_add(packets, Ordering::Relaxed);
                    if !std::mem::replace(&mut failed, true) {
                        tracing::warn!("writing PACKET: lines to the standard output: {e}");
                    }
                }
            }
            Chunk::Barrier(done) => {
                let _ = done.send(());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    /// Takes what is written once it is let go.
    #[derive(Clone, Default)]
    struct Held {
        go: Arc<(Mutex<bool>, std::sync::Condvar)>,
        taken: Arc<Mutex<Vec<u8>>>,
        wrote: Arc<std::sync::Condvar>,
    }

    impl Held {
        fn release(&self) {
            *self.go.0.lock().unwrap() = true;
            self.go.1.notify_all();
        }

        fn until_taken(&self, len: usize) {
            let taken = self.taken.lock().unwrap();
            drop(self.wrote.wait_while(taken, |t| t.len() < len).unwrap());
        }
    }

    impl Write for Held {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            let (go, released) = &*self.go;
            drop(released.wait_while(go.lock().unwrap(), |go| !*go).unwrap());
            self.taken.lock().unwrap().extend_from_slice(buf);
            self.wrote.notify_all();
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A pipe nobody reads holds the lines up to the limit and refuses the
    /// rest at once; once it is read, everything queued comes out in order.
    #[test]
    fn a_pipe_nobody_reads_refuses_lines_past_the_limit() {
        let held = Held::default();
        let lines = Lines::spawn(held.clone(), 8);
        let counters = Arc::new(Counters::default());
        assert_eq!(lines.send(b"one\n".to_vec(), 1, &counters), Ok(()));
        assert_eq!(lines.send(b"two\n".to_vec(), 1, &counters), Ok(()));
        assert_eq!(
            lines.send(b"three\n".to_vec(), 1, &counters),
            Err(b"three\n".to_vec())
        );
        assert!(
            !lines.written(Duration::from_millis(50)),
            "nothing was read"
        );
        let started = std::time::Instant::now();
        assert!(!lines.written(Duration::from_secs(600)), "still nothing");
        assert!(
            started.elapsed() < Duration::from_secs(60),
            "a stalled output is not waited for again"
        );
        held.release();
        // Once the second line is out, the writer has taken all there was.
        held.until_taken(b"one\ntwo\n".len());
        assert!(lines.written(Duration::from_secs(10)));
        assert_eq!(lines.send(b"four\n".to_vec(), 1, &counters), Ok(()));
        assert!(lines.written(Duration::from_secs(10)));
        assert_eq!(&*held.taken.lock().unwrap(), b"one\ntwo\nfour\n");
    }

    struct Broken;

    impl Write for Broken {
        fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
            Err(std::io::ErrorKind::BrokenPipe.into())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// The packets of lines that could not be written are dropped.
    #[test]
    fn lines_that_fail_count_their_packets_dropped() {
        let lines = Lines::spawn(Broken, 1 << 20);
        let counters = Arc::new(Counters::default());
        counters.packets.store(5, Ordering::Relaxed);
        lines.send(b"a\nb\nc\n".to_vec(), 3, &counters).unwrap();
        assert!(lines.written(Duration::from_secs(10)));
        assert_eq!(counters.packets.load(Ordering::Relaxed), 2);
        assert_eq!(counters.dropped.load(Ordering::Relaxed), 3);
        assert_eq!(lines.queued.load(Ordering::Relaxed), 0);
    }
}
