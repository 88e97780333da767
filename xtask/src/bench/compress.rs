//! How fast the agent's settings compress a capture file it wrote: gzip
//! through flate2 with the zlib-rs backend at `Compression::fast()`, and
//! zstd at level 1, each on a thread of the lowest priority (SCHED_IDLE), as
//! the agent's maintenance thread runs them. The outputs are checked with
//! `gzip -t` and `zstd -t`.

use std::fs::File;
use std::io::{BufReader, Write};
use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::Context as _;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Compressed {
    pub method: String,
    pub input_bytes: u64,
    pub output_bytes: u64,
    pub seconds: f64,
    /// Input megabytes (10^6 bytes) per second.
    pub mb_per_s: f64,
    /// `gzip -t` / `zstd -t` accepted the output.
    pub verified: bool,
}

pub fn measure(path: &Path) -> anyhow::Result<Vec<Compressed>> {
    let input_bytes = std::fs::metadata(path)?.len();
    let mut results = Vec::new();
    for method in ["gzip (flate2 zlib-rs, fast)", "zstd (level 1)"] {
        let gzip = method.starts_with("gzip");
        let out = path.with_extension(if gzip { "pcap.gz" } else { "pcap.zst" });
        let seconds = std::thread::scope(|s| {
            s.spawn(|| -> anyhow::Result<f64> {
                let param = libc::sched_param { sched_priority: 0 };
                // SAFETY: changes the calling thread's policy only.
                if unsafe { libc::sched_setscheduler(0, libc::SCHED_IDLE, &param) } != 0 {
                    return Err(std::io::Error::last_os_error()).context("SCHED_IDLE");
                }
                let mut input = BufReader::with_capacity(1 << 20, File::open(path)?);
                let output = File::create(&out)?;
                let start = Instant::now();
                let file = if gzip {
                    let mut enc =
                        flate2::write::GzEncoder::new(output, flate2::Compression::fast());
                    std::io::copy(&mut input, &mut enc)?;
                    enc.finish()?
                } else {
                    let mut enc = zstd::Encoder::new(output, 1)?;
                    std::io::copy(&mut input, &mut enc)?;
                    enc.finish()?
                };
                let mut file = file;
                file.flush()?;
                Ok(start.elapsed().as_secs_f64())
            })
            .join()
            .map_err(|_| anyhow::anyhow!("the compression thread panicked"))?
        })?;
        let output_bytes = std::fs::metadata(&out)?.len();
        let verified = Command::new(if gzip { "gzip" } else { "zstd" })
            .args(["-t", "-q"])
            .arg(&out)
            .status()
            .is_ok_and(|s| s.success());
        std::fs::remove_file(&out)?;
        results.push(Compressed {
            method: method.to_owned(),
            input_bytes,
            output_bytes,
            seconds,
            mb_per_s: input_bytes as f64 / 1e6 / seconds.max(1e-9),
            verified,
        });
    }
    std::fs::remove_file(path)?;
    Ok(results)
}
