//! The capture directory: files are written under a hidden temporary name
//! and renamed when whole; completed files are compressed, except the
//! newest, on a low-priority thread ([`CaptureDir::spawn_maintenance`]); at
//! most `max_files` are kept; a finished file is found under its name as it
//! is now, plain or compressed ([`CaptureDir::current`]); downloads only
//! ever open regular files directly inside the directory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsFd;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::mpsc::{Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use crate::mmap::Mapping;
use crate::sync::lock;
use crate::writer;

/// Suffix of files still being written.
const PARTIAL: &str = ".partial";
/// Mode of capture files: owner read-write, group read.
const FILE_MODE: u32 = 0o640;
/// Extensions of the files captures write.
use packet_capture_common::validate::{COMPRESSED_EXTENSIONS, PLAIN_EXTENSIONS};
/// How often maintenance runs when no capture ends.
const MAINTENANCE_INTERVAL: Duration = Duration::from_secs(60);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    Gzip,
    Zstd,
}

impl Compression {
    pub const ALL: [Compression; 2] = [Self::Gzip, Self::Zstd];

    pub fn extension(self) -> &'static str {
        match self {
            Self::Gzip => COMPRESSED_EXTENSIONS[0],
            Self::Zstd => COMPRESSED_EXTENSIONS[1],
        }
    }

    /// The name of `file_name`'s compressed copy.
    fn name_of(self, file_name: &str) -> String {
        format!("{file_name}.{}", self.extension())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0:?} is not a compression (gzip or zstd)")]
pub struct UnknownCompression(String);

impl std::str::FromStr for Compression {
    type Err = UnknownCompression;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "gzip" => Ok(Self::Gzip),
            "zstd" => Ok(Self::Zstd),
            other => Err(UnknownCompression(other.to_owned())),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum FileError {
    #[error("{0:?} is not a capture file name")]
    BadName(String),
    #[error("no capture file {0:?}")]
    NotFound(String),
    #[error("{name:?}: {source}")]
    Io {
        name: String,
        #[source]
        source: io::Error,
    },
}

/// A file in the capture directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileEntry {
    pub name: String,
    pub size: u64,
    pub modified: SystemTime,
}

#[derive(Debug)]
pub struct CaptureDir {
    dir: PathBuf,
    max_files: usize,
    compression: Compression,
    /// Held while a compressed copy replaces its plain file (a rename, then
    /// a removal); true once the agent stops, from when no copy replaces
    /// its file, so that an exit never leaves a capture twice.
    stopped: Mutex<bool>,
}

/// Whether `name` may name a file of the capture directory.
pub use packet_capture_common::validate::plain_file_name as valid_name;

pub use packet_capture_common::validate::capture_of;

impl CaptureDir {
    pub fn new(
        dir: impl Into<PathBuf>,
        max_files: usize,
        compression: Compression,
    ) -> io::Result<Self> {
        let dir = dir.into();
        fs::create_dir_all(&dir)?;
        Ok(Self {
            dir,
            max_files,
            compression,
            stopped: Mutex::new(false),
        })
    }

    pub fn path(&self) -> &Path {
        &self.dir
    }

    /// Starts `<name>-<YYYYmmdd-HHMMSS>.<ext>` under a temporary name. A
    /// name taken in the same second gets `-1`, `-2`, … appended.
    pub fn create(
        &self,
        name: &str,
        extension: &str,
        unix_secs: i64,
        limit: u64,
    ) -> io::Result<Output> {
        if !valid_name(name) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{name:?} cannot be used in a file name"),
            ));
        }
        let stamp = file_stamp(unix_secs)?;
        let mut n = 0u64;
        loop {
            let file_name = match n {
                0 => format!("{name}-{stamp}.{extension}"),
                n => format!("{name}-{stamp}-{n}.{extension}"),
            };
            n += 1;
            let final_path = self.dir.join(&file_name);
            if self.on_disk(&file_name).is_some() {
                continue;
            }
            let temp = self.dir.join(format!(".{file_name}{PARTIAL}"));
            match OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(FILE_MODE)
                .open(&temp)
            {
                Ok(file) => {
                    let output = Output {
                        file,
                        temp,
                        final_path,
                        buf: Vec::with_capacity(FLUSH_BYTES * 2),
                        written: 0,
                        header: 0,
                        limit,
                    };
                    // Another capture of this name may have committed the
                    // same final name between the check above and this
                    // temporary file: its rename freed the temporary name.
                    // Renaming onto it later would replace its file.
                    if self.on_disk(&file_name).is_some() {
                        output.abandon();
                        continue;
                    }
                    return Ok(output);
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The completed file written as `file_name`, as it is on disk now:
    /// plain, or compressed by maintenance (whatever the compression was
    /// when it ran). Its path and size.
    fn on_disk(&self, file_name: &str) -> Option<(PathBuf, u64)> {
        let plain = std::iter::once(file_name.to_owned());
        let compressed = Compression::ALL.iter().map(|c| c.name_of(file_name));
        plain.chain(compressed).find_map(|name| {
            let path = self.dir.join(name);
            fs::metadata(&path).ok().map(|m| (path, m.len()))
        })
    }

    /// Whether a capture file was written as `file_name` and is still
    /// there, plain or compressed since.
    pub fn holds(&self, file_name: &str) -> bool {
        self.on_disk(file_name).is_some()
    }

    /// A finished capture file as it is now: after compression its name
    /// ends in `.gz` or `.zst` and its size is the compressed size. A file
    /// no longer there (removed beyond `max_files`) keeps what it was.
    pub fn current(&self, finished: &Path, size: u64) -> (PathBuf, u64) {
        finished
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| self.on_disk(n))
            .unwrap_or_else(|| (finished.to_path_buf(), size))
    }

    /// At start: temporary files left by an interrupted capture become whole
    /// files cut at their last whole record, or go; half-written compressed
    /// copies go (their plain file is still there), and so does a plain
    /// file next to its whole copy. Returns what was kept.
    pub fn recover(&self) -> io::Result<Vec<PathBuf>> {
        let mut kept = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let file_name = entry.file_name().to_string_lossy().into_owned();
            let Some(final_name) = file_name
                .strip_prefix('.')
                .and_then(|n| n.strip_suffix(PARTIAL))
            else {
                continue;
            };
            // Only files: a link would be followed by the reads and the
            // truncation below, to wherever it points.
            if !entry.file_type()?.is_file() {
                tracing::warn!(file = %entry.path().display(), "left alone: not a regular file");
                continue;
            }
            let temp = entry.path();
            let final_path = self.dir.join(final_name);
            let whole = whole_length(&temp, final_name)?;
            match whole {
                Some(len) if !final_path.exists() => {
                    let file = OpenOptions::new().write(true).open(&temp)?;
                    file.set_len(len)?;
                    file.sync_all()?;
                    fs::rename(&temp, &final_path)?;
                    tracing::info!(file = %final_path.display(), bytes = len, "recovered an interrupted capture file");
                    kept.push(final_path);
                }
                _ => {
                    fs::remove_file(&temp)?;
                    tracing::info!(file = %temp.display(), "removed an unfinished file");
                }
            }
        }
        // The agent died between a copy's rename and the removal of its
        // plain file: the copy is whole, renamed in only once synced.
        for (path, entry) in self.completed()? {
            let replaced = is_plain(&path)
                && Compression::ALL.iter().any(|c| {
                    fs::symlink_metadata(self.dir.join(c.name_of(&entry.name)))
                        .is_ok_and(|m| m.is_file())
                });
            if replaced {
                fs::remove_file(&path)?;
                tracing::info!(file = %path.display(), "removed a file already compressed");
            }
        }
        Ok(kept)
    }

    /// Completed capture files (plain and compressed), oldest first. Files
    /// of other names (one copied in by hand) are neither listed, nor
    /// compressed, nor removed.
    fn completed(&self) -> io::Result<Vec<(PathBuf, FileEntry)>> {
        let mut files = Vec::new();
        for entry in fs::read_dir(&self.dir)? {
            let entry = entry?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if !valid_name(&name) || capture_of(&name).is_none() {
                continue;
            }
            let (path, name, meta) = match entry.metadata() {
                Ok(meta) => (entry.path(), name, meta),
                // Gone since the directory was read: pruned, or compressed
                // (the original removed once its copy is complete), and
                // the read may have begun before the copy was there.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    let copy = Compression::ALL.iter().find_map(|c| {
                        let name = c.name_of(&name);
                        let path = self.dir.join(&name);
                        fs::symlink_metadata(&path).ok().map(|m| (path, name, m))
                    });
                    match copy {
                        Some(copy) => copy,
                        None => continue,
                    }
                }
                Err(e) => return Err(e),
            };
            if !meta.is_file() {
                continue;
            }
            files.push((
                path,
                FileEntry {
                    name,
                    size: meta.len(),
                    modified: meta.modified()?,
                },
            ));
        }
        files.sort_by(|a, b| (a.1.modified, &a.1.name).cmp(&(b.1.modified, &b.1.name)));
        // A copy found for its gone original may be read from the directory too.
        files.dedup_by(|a, b| a.1.name == b.1.name);
        Ok(files)
    }

    /// Capture files, newest first.
    pub fn list(&self) -> io::Result<Vec<FileEntry>> {
        let mut files: Vec<FileEntry> = self.completed()?.into_iter().map(|(_, e)| e).collect();
        files.reverse();
        Ok(files)
    }

    /// Opens a file for download: a valid name of a regular file directly in
    /// the directory, never through a symbolic link; with its metadata.
    pub fn open(&self, name: &str) -> Result<(File, fs::Metadata), FileError> {
        if !valid_name(name) {
            return Err(FileError::BadName(name.to_owned()));
        }
        let file = OpenOptions::new()
            .read(true)
            .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
            .open(self.dir.join(name))
            .map_err(|source| match source.kind() {
                io::ErrorKind::NotFound => FileError::NotFound(name.to_owned()),
                _ if source.raw_os_error() == Some(libc::ELOOP) => {
                    FileError::NotFound(name.to_owned())
                }
                _ => FileError::Io {
                    name: name.to_owned(),
                    source,
                },
            })?;
        let meta = file.metadata().map_err(|source| FileError::Io {
            name: name.to_owned(),
            source,
        })?;
        if !meta.is_file() {
            return Err(FileError::NotFound(name.to_owned()));
        }
        Ok((file, meta))
    }

    /// Runs [`CaptureDir::maintain`] on a thread of the lowest priority:
    /// now, whenever [`Maintenance::poke`] asks, and every minute. The
    /// thread ends when the [`Maintenance`] is dropped.
    pub fn spawn_maintenance(self: &Arc<Self>) -> io::Result<Maintenance> {
        let (tx, rx) = std::sync::mpsc::channel();
        let dir = self.clone();
        std::thread::Builder::new()
            .name("files".into())
            .spawn(move || dir.maintain_on_request(&rx))?;
        Ok(Maintenance {
            poke: tx,
            dir: self.clone(),
        })
    }

    fn maintain_on_request(&self, requests: &Receiver<()>) {
        let param = libc::sched_param { sched_priority: 0 };
        // SAFETY: changes this thread's policy only.
        if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
            tracing::debug!(error = %io::Error::last_os_error(), "SCHED_IDLE");
        }
        loop {
            if let Err(e) = self.maintain() {
                tracing::warn!(error = %e, "capture file maintenance");
            }
            match requests.recv_timeout(MAINTENANCE_INTERVAL) {
                Ok(()) | Err(RecvTimeoutError::Timeout) => {}
                Err(RecvTimeoutError::Disconnected) => return,
            }
        }
    }

    /// Compresses every completed plain file but the newest, then removes
    /// the oldest files beyond `max_files`. Meant for a low-priority thread.
    pub fn maintain(&self) -> io::Result<()> {
        let files = self.completed()?;
        let plain: Vec<&PathBuf> = files
            .iter()
            .filter(|(p, _)| is_plain(p))
            .map(|(p, _)| p)
            .collect();
        if let Some((_, older)) = plain.split_last() {
            for path in older {
                if let Err(e) = self.compress(path) {
                    tracing::warn!(file = %path.display(), error = %e, "compressing a capture file failed");
                }
            }
        }
        let files = self.completed()?;
        let excess = files.len().saturating_sub(self.max_files);
        for (path, _) in files.iter().take(excess) {
            fs::remove_file(path)?;
            tracing::info!(file = %path.display(), max_files = self.max_files, "removed an old capture file");
        }
        Ok(())
    }

    fn compress(&self, path: &Path) -> io::Result<()> {
        let file_name = path.file_name().unwrap_or_default().to_string_lossy();
        let compressed_name = self.compression.name_of(&file_name);
        let target = self.dir.join(&compressed_name);
        let temp = self.dir.join(format!(".{compressed_name}{PARTIAL}"));
        let mut input = File::open(path)?;
        let modified = input.metadata()?.modified()?;
        let out = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(FILE_MODE)
            .open(&temp)?;
        let result = (|| -> io::Result<File> {
            match self.compression {
                Compression::Gzip => {
                    let mut enc = flate2::write::GzEncoder::new(out, flate2::Compression::fast());
                    io::copy(&mut input, &mut enc)?;
                    enc.finish()
                }
                Compression::Zstd => {
                    let mut enc = zstd::Encoder::new(out, 1)?;
                    io::copy(&mut input, &mut enc)?;
                    enc.finish()
                }
            }
        })();
        let out = match result {
            Ok(out) => out,
            Err(e) => {
                let _ = fs::remove_file(&temp);
                return Err(e);
            }
        };
        out.sync_all()?;
        // The compressed copy keeps the capture's time, so age ordering holds.
        out.set_modified(modified)?;
        // Held to the end: shutdown waits for the rename and the removal.
        let stopped = lock(&self.stopped);
        if *stopped {
            fs::remove_file(&temp)?;
            return Ok(());
        }
        fs::rename(&temp, &target)?;
        fs::remove_file(path)
    }
}

/// Asks the maintenance thread for a run, e.g. after a capture ended.
#[derive(Debug)]
pub struct Maintenance {
    poke: Sender<()>,
    dir: Arc<CaptureDir>,
}

impl Maintenance {
    pub fn poke(&self) {
        let _ = self.poke.send(());
    }

    /// Waits for a compressed copy replacing its file, and keeps any other
    /// from doing so: after this, the process may exit at any time without
    /// leaving a capture both plain and compressed.
    pub fn stop(&self) {
        *lock(&self.dir.stopped) = true;
    }
}

fn is_plain(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| PLAIN_EXTENSIONS.contains(&e))
}

/// The length of the whole records at the start of an unfinished file, by
/// its format; `None` when nothing usable is there.
fn whole_length(path: &Path, final_name: &str) -> io::Result<Option<u64>> {
    let extension = final_name.rsplit('.').next().unwrap_or_default();
    if !PLAIN_EXTENSIONS.contains(&extension) {
        return Ok(None);
    }
    let file = File::open(path)?;
    let len = usize::try_from(file.metadata()?.len()).unwrap_or(usize::MAX);
    if len == 0 {
        return Ok(None);
    }
    // Mapped, not read into memory: a file may be up to
    // MAX_CAPTURE_FILE_SIZE_MB, more than the agent's memory limit. The page
    // cache holds what the parse touches and can drop it again. Recovery
    // runs before any capture, so nothing writes to the file meanwhile.
    let mapping = Mapping::new(file.as_fd(), len, libc::PROT_READ, 0)?;
    let bytes = mapping.bytes();
    let whole = match extension {
        "pcap" => writer::pcap_whole_prefix(bytes),
        "pcapng" => writer::pcapng_whole_prefix(bytes),
        _ => bytes.iter().rposition(|&b| b == b'\n').map(|i| i + 1),
    };
    Ok(whole.filter(|&n| n > 0).map(|n| n as u64))
}

/// `YYYYmmdd-HHMMSS` in UTC, as capture file names carry it.
fn file_stamp(unix_secs: i64) -> io::Result<String> {
    let t = time::OffsetDateTime::from_unix_timestamp(unix_secs)
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    Ok(format!(
        "{:04}{:02}{:02}-{:02}{:02}{:02}",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    ))
}

/// Bytes gathered before they are written: whole records only reach the file.
const FLUSH_BYTES: usize = 256 * 1024;

/// A capture file being written.
#[derive(Debug)]
pub struct Output {
    file: File,
    temp: PathBuf,
    final_path: PathBuf,
    buf: Vec<u8>,
    /// Bytes in the file, all of them whole records.
    written: u64,
    /// Bytes of the file's header: a file with fewer is not one of its
    /// format.
    header: u64,
    /// The file may not grow beyond this many bytes.
    limit: u64,
}

/// The record would take the file past its size limit.
#[derive(Debug, PartialEq, Eq)]
pub struct Full;

impl Output {
    /// Where the file will be once complete.
    pub fn final_path(&self) -> &Path {
        &self.final_path
    }

    /// Bytes written or waiting to be.
    pub fn size(&self) -> u64 {
        self.written + self.buf.len() as u64
    }

    /// Appends one record built by `encode`; refuses it whole if it would
    /// take the file past the limit. The caller flushes (see [`Output::pending`]).
    pub fn append(&mut self, encode: impl FnOnce(&mut Vec<u8>)) -> Result<(), Full> {
        let before = self.buf.len();
        encode(&mut self.buf);
        if self.written + self.buf.len() as u64 > self.limit {
            self.buf.truncate(before);
            return Err(Full);
        }
        Ok(())
    }

    /// Gathers the file's header, first of all.
    pub fn append_header(&mut self, encode: impl FnOnce(&mut Vec<u8>)) -> Result<(), Full> {
        self.append(encode)?;
        self.header = self.buf.len() as u64;
        Ok(())
    }

    /// Whether the file on disk lacks its header: before the first flush,
    /// or once a failed one cut the file back to before its end.
    pub fn lacks_header(&self) -> bool {
        self.written < self.header
    }

    /// Writes the gathered records. On failure the file is cut back to its
    /// last whole record, so it stays readable.
    pub fn flush(&mut self) -> io::Result<()> {
        self.flush_counted().map(drop)
    }

    /// [`Output::flush`], returning how many bytes reached the file.
    pub fn flush_counted(&mut self) -> io::Result<u64> {
        if self.buf.is_empty() {
            return Ok(0);
        }
        match self.file.write_all(&self.buf) {
            Ok(()) => {
                let bytes = self.buf.len() as u64;
                self.written += bytes;
                self.buf.clear();
                Ok(bytes)
            }
            Err(e) => {
                self.buf.clear();
                let _ = self.file.set_len(self.written);
                Err(e)
            }
        }
    }

    /// Bytes gathered but not yet written (lost if the flush fails).
    pub fn pending(&self) -> usize {
        self.buf.len()
    }

    /// Whether enough has gathered to be worth a write.
    pub fn wants_flush(&self) -> bool {
        self.buf.len() >= FLUSH_BYTES
    }

    /// Removes the unfinished file: a capture that never started. (An
    /// output merely dropped, as by a thread that panicked, leaves its file
    /// for [`CaptureDir::recover`] at the next start.)
    pub fn abandon(self) {
        let _ = fs::remove_file(&self.temp);
    }

    /// Writes what remains and gives the file its final name. A file that
    /// could not be made durable or lacks its header (a full disk) is
    /// removed, not presented as finished, and does not go on taking the
    /// space.
    pub fn commit(mut self) -> io::Result<(PathBuf, u64)> {
        let flushed = self.flush();
        if self.lacks_header() {
            self.abandon();
            return Err(flushed.err().unwrap_or_else(|| {
                io::Error::other("a failed write left the file without its header")
            }));
        }
        // Files age from when they were finished, not from their last
        // write: a long capture that matched little early on is the newest
        // file, not one to compress or remove first.
        let finished = self.file.set_modified(SystemTime::now());
        if let Err(e) = finished.and_then(|()| self.file.sync_data()) {
            self.abandon();
            return Err(e);
        }
        fs::rename(&self.temp, &self.final_path)?;
        flushed.map(|()| (self.final_path, self.written))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::writer::{Direction, Encoder, Meta};
    use packet_capture_common::crd::OutputFormat;
    use std::collections::HashMap;
    use std::io::Read;
    use std::os::unix::fs::MetadataExt as _;
    use std::os::unix::fs::symlink;

    fn dir() -> (tempfile::TempDir, CaptureDir) {
        let t = tempfile::tempdir().unwrap();
        let d = CaptureDir::new(t.path(), 3, Compression::Gzip).unwrap();
        (t, d)
    }

    fn pcap_with(n: usize) -> Vec<u8> {
        let mut enc = Encoder::new(OutputFormat::Pcap, 262_144);
        let mut out = Vec::new();
        enc.file_header(&mut out);
        let meta = Meta {
            unix_ns: 1,
            ifindex: 1,
            direction: Direction::In,
            orig_len: 60,
        };
        for _ in 0..n {
            enc.encode(&mut out, &meta, &[0u8; 60], &HashMap::new())
                .unwrap();
        }
        out
    }

    #[test]
    fn file_names_carry_the_utc_time() {
        assert_eq!(file_stamp(0).unwrap(), "19700101-000000");
        assert_eq!(file_stamp(1_701_441_022).unwrap(), "20231201-143022");
        // A leap day and the end of a century that is not a leap year.
        assert_eq!(file_stamp(951_782_400).unwrap(), "20000229-000000");
        assert_eq!(file_stamp(4_107_542_399).unwrap(), "21000228-235959");
        assert!(file_stamp(i64::MAX).is_err());
    }

    #[test]
    fn files_name_their_capture() {
        let (_tmp, d) = dir();
        for name in ["cap", "a-20231201-143022", "web.v2_x", "7"] {
            for ext in PLAIN_EXTENSIONS {
                let first = d.create(name, ext, 1_701_441_022, 1 << 20).unwrap();
                let second = d.create(name, ext, 1_701_441_022, 1 << 20).unwrap();
                for out in [&first, &second] {
                    let file = out.final_path().file_name().unwrap().to_str().unwrap();
                    assert_eq!(capture_of(file), Some(name), "{file}");
                    for c in Compression::ALL {
                        let compressed = format!("{file}.{}", c.extension());
                        assert_eq!(capture_of(&compressed), Some(name), "{compressed}");
                    }
                }
            }
        }
        for other in [
            "cap.pcap",
            "cap-20231201.pcap",
            "cap-20231201-143022.bin",
            "cap-20231201-143022.pcap.xz",
            "-20231201-143022.pcap",
            "cap-2023120-143022.pcap",
            "cap-20231201-143022-.pcap",
            "cap-20231201-143022-x.pcap",
            "cap-20231201-143022.gz",
            "",
        ] {
            assert_eq!(capture_of(other), None, "{other}");
        }
    }

    #[test]
    fn names_are_one_plain_component() {
        for bad in [
            "",
            ".",
            "..",
            "../x",
            "/etc/passwd",
            "a/b",
            ".hidden.pcap.partial",
            "x%2f..",
            "a\0b",
        ] {
            assert!(!valid_name(bad), "{bad:?}");
        }
        assert!(valid_name("web-20231201-143022.pcap.gz"));
    }

    #[test]
    fn an_abandoned_output_leaves_nothing_and_a_dropped_one_is_recovered() {
        let (t, d) = dir();
        let files = || fs::read_dir(t.path()).unwrap().count();
        let output = || {
            let mut out = d.create("cap", "pcap", 1_701_441_022, u64::MAX).unwrap();
            out.append(|b| b.extend_from_slice(&pcap_with(1))).unwrap();
            out.flush().unwrap();
            out
        };
        output().abandon();
        assert_eq!(files(), 0);
        // Dropped as by a thread that panicked: the next start has it.
        drop(output());
        assert_eq!(files(), 1);
        assert_eq!(d.recover().unwrap().len(), 1);
        assert_eq!(d.list().unwrap().len(), 1);
    }

    #[test]
    fn files_appear_only_when_whole() {
        let (_t, d) = dir();
        let mut out = d.create("cap", "pcap", 1_701_441_022, u64::MAX).unwrap();
        out.append(|b| b.extend_from_slice(&pcap_with(1))).unwrap();
        assert_eq!(d.list().unwrap(), []);
        let (path, size) = out.commit().unwrap();
        assert_eq!(path.file_name().unwrap(), "cap-20231201-143022.pcap");
        let listed = d.list().unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(listed[0].size, size);
        assert_eq!(fs::metadata(&path).unwrap().mode() & 0o777, 0o640);
        // The same name in the same second does not clobber it.
        let again = d.create("cap", "pcap", 1_701_441_022, u64::MAX).unwrap();
        assert_eq!(
            again.final_path().file_name().unwrap(),
            "cap-20231201-143022-1.pcap"
        );
    }

    #[test]
    fn the_limit_refuses_whole_records() {
        let (_t, d) = dir();
        let mut out = d.create("cap", "pcap", 0, 100).unwrap();
        out.append(|b| b.extend_from_slice(&[0; 60])).unwrap();
        assert_eq!(out.append(|b| b.extend_from_slice(&[0; 60])), Err(Full));
        assert_eq!(out.size(), 60);
    }

    #[test]
    fn recovery_cuts_at_the_last_whole_record() {
        let (_t, d) = dir();
        let mut bytes = pcap_with(3);
        bytes.truncate(bytes.len() - 10);
        fs::write(d.path().join(".cut-20231201-143022.pcap.partial"), &bytes).unwrap();
        fs::write(
            d.path().join(".empty-20231201-143022.pcap.partial"),
            b"\xd4\xc3",
        )
        .unwrap();
        fs::write(d.path().join(".x-20231201-143022.pcap.gz.partial"), b"junk").unwrap();
        let kept = d.recover().unwrap();
        assert_eq!(kept.len(), 1);
        let recovered = fs::read(&kept[0]).unwrap();
        assert_eq!(recovered, pcap_with(2));
        let names: Vec<String> = d.list().unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(names, ["cut-20231201-143022.pcap"]);
        assert_eq!(
            fs::read_dir(d.path()).unwrap().count(),
            1,
            "temporary files are gone"
        );
    }

    /// A file no capture wrote is not the agent's: not listed, and left as
    /// it is by maintenance.
    #[test]
    fn files_of_other_names_are_left_alone() {
        let (_t, d) = dir();
        fs::write(d.path().join("debug.pcap"), pcap_with(2)).unwrap();
        for i in 0..4 {
            let mut out = d.create("c", "pcap", 1_000 + i, u64::MAX).unwrap();
            out.append(|b| b.extend_from_slice(&pcap_with(1))).unwrap();
            out.commit().unwrap();
        }
        d.maintain().unwrap();
        assert!(d.list().unwrap().iter().all(|e| e.name != "debug.pcap"));
        assert_eq!(fs::read(d.path().join("debug.pcap")).unwrap(), pcap_with(2));
    }

    /// A temporary name that is a link is left as it is: recovery would
    /// otherwise read and cut whatever it points to.
    #[test]
    fn recovery_follows_no_links() {
        let (_t, d) = dir();
        let outside = tempfile::tempdir().unwrap();
        let target = outside.path().join("precious");
        let mut bytes = pcap_with(3);
        bytes.truncate(bytes.len() - 10);
        fs::write(&target, &bytes).unwrap();
        let link = d.path().join(".link-20231201-143022.pcap.partial");
        std::os::unix::fs::symlink(&target, &link).unwrap();
        assert!(d.recover().unwrap().is_empty());
        assert_eq!(fs::read(&target).unwrap(), bytes);
        assert!(fs::symlink_metadata(&link).unwrap().is_symlink());
        assert!(d.list().unwrap().is_empty());
    }

    #[test]
    fn maintain_compresses_all_but_the_newest_and_keeps_max_files() {
        let (_t, d) = dir();
        for i in 0..5 {
            finished_at(&d, &format!("c{i}"), 1_000 + i);
        }
        d.maintain().unwrap();
        let names: Vec<String> = d.list().unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(
            names,
            [
                "c4-19700101-001644.pcap",
                "c3-19700101-001643.pcap.gz",
                "c2-19700101-001642.pcap.gz",
            ]
        );
        let mut gz = flate2::read::GzDecoder::new(File::open(d.path().join(&names[1])).unwrap());
        let mut plain = Vec::new();
        gz.read_to_end(&mut plain).unwrap();
        assert_eq!(plain, pcap_with(10));
    }

    /// A finished file of 10 packets, named and last written at `secs`.
    fn finished_at(d: &CaptureDir, name: &str, secs: i64) -> PathBuf {
        let mut out = d.create(name, "pcap", secs, u64::MAX).unwrap();
        out.append(|b| b.extend_from_slice(&pcap_with(10))).unwrap();
        let (path, _) = out.commit().unwrap();
        set_time(
            &path,
            SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(secs as u64),
        );
        path
    }

    /// Makes `path` look last written at `t`.
    fn set_time(path: &Path, t: SystemTime) {
        File::options()
            .write(true)
            .open(path)
            .unwrap()
            .set_modified(t)
            .unwrap();
    }

    /// Two finished files, the first one older: maintenance compresses it.
    fn two_finished(d: &CaptureDir) -> [PathBuf; 2] {
        [("a", 1_000), ("b", 2_000)].map(|(name, secs)| finished_at(d, name, secs))
    }

    fn names_in(d: &CaptureDir) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(d.path())
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// A capture that wrote its last packet long before it ended is the
    /// newest file once it has ended: it stays plain, and the ones that
    /// ended before it are compressed.
    #[test]
    fn a_file_ages_from_when_it_was_finished() {
        let (_t, d) = dir();
        let mut long = d.create("long", "pcap", 1_000, u64::MAX).unwrap();
        long.append(|b| b.extend_from_slice(&pcap_with(10)))
            .unwrap();
        long.flush().unwrap();
        let ago = |secs| SystemTime::now() - std::time::Duration::from_secs(secs);
        long.file.set_modified(ago(3600)).unwrap();
        let short = finished_at(&d, "short", 2_000);
        set_time(&short, ago(600));
        let (path, _) = long.commit().unwrap();
        d.maintain().unwrap();
        let names: Vec<String> = d.list().unwrap().into_iter().map(|e| e.name).collect();
        assert_eq!(
            names,
            [
                path.file_name().unwrap().to_str().unwrap(),
                "short-19700101-003320.pcap.gz"
            ]
        );
    }

    #[test]
    fn once_stopped_no_file_is_replaced_by_its_copy() {
        let (_t, d) = dir();
        let d = Arc::new(d);
        let maintenance = d.spawn_maintenance().unwrap();
        maintenance.stop();
        two_finished(&d);
        d.maintain().unwrap();
        assert_eq!(
            names_in(&d),
            ["a-19700101-001640.pcap", "b-19700101-003320.pcap"]
        );
    }

    #[test]
    fn recovery_removes_a_plain_file_next_to_its_whole_copy() {
        let (_t, d) = dir();
        let [a, b] = two_finished(&d);
        d.maintain().unwrap();
        // As if the agent died after the copy's rename.
        fs::write(&a, pcap_with(10)).unwrap();
        assert_eq!(names_in(&d).len(), 3);
        d.recover().unwrap();
        assert_eq!(
            names_in(&d),
            ["a-19700101-001640.pcap.gz", "b-19700101-003320.pcap"]
        );
        assert_eq!(fs::read(&b).unwrap(), pcap_with(10));
    }

    #[test]
    fn a_finished_file_is_found_as_it_is_now() {
        let (_t, d) = dir();
        let older = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000);
        let mut out = d.create("a", "pcap", 1_000, u64::MAX).unwrap();
        out.append(|b| b.extend_from_slice(&pcap_with(50))).unwrap();
        let (path, size) = out.commit().unwrap();
        File::options()
            .write(true)
            .open(&path)
            .unwrap()
            .set_modified(older)
            .unwrap();
        assert_eq!(d.current(&path, size), (path.clone(), size));

        // A newer file: maintenance compresses the first one.
        let mut newer = d.create("b", "pcap", 2_000, u64::MAX).unwrap();
        newer
            .append(|b| b.extend_from_slice(&pcap_with(1)))
            .unwrap();
        newer.commit().unwrap();
        d.maintain().unwrap();
        let gz = d.path().join("a-19700101-001640.pcap.gz");
        let gz_size = fs::metadata(&gz).unwrap().len();
        assert!(gz_size < size, "{gz_size} compressed, {size} plain");
        assert_eq!(d.current(&path, size), (gz.clone(), gz_size));
        // The compressed file still holds the name against a new capture.
        let again = d.create("a", "pcap", 1_000, u64::MAX).unwrap();
        assert_eq!(
            again.final_path().file_name().unwrap(),
            "a-19700101-001640-1.pcap"
        );
        again.abandon();

        // Gone altogether: the status keeps what it last knew.
        fs::remove_file(&gz).unwrap();
        assert_eq!(d.current(&path, size), (path.clone(), size));
    }

    #[test]
    fn open_refuses_anything_but_a_regular_file_inside() {
        let (t, d) = dir();
        fs::write(t.path().join("ok.pcap"), b"x").unwrap();
        symlink("/etc/passwd", t.path().join("link.pcap")).unwrap();
        fs::create_dir(t.path().join("sub.pcap")).unwrap();
        assert_eq!(d.open("ok.pcap").unwrap().1.len(), 1);
        for (name, want) in [
            ("link.pcap", "no capture file"),
            ("sub.pcap", "no capture file"),
            ("../ok.pcap", "is not a capture file name"),
            ("/etc/passwd", "is not a capture file name"),
            ("missing.pcap", "no capture file"),
        ] {
            let err = d.open(name).unwrap_err().to_string();
            assert!(err.contains(want), "{name}: {err}");
        }
    }
}
