//! What the kernel says about processes and CPUs: CPU time, peak memory,
//! BPF map memory.

use std::collections::HashMap;

use anyhow::{Context as _, bail};

/// Clock ticks per second of `/proc` times.
pub fn ticks_per_second() -> f64 {
    // SAFETY: sysconf has no preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 { t as f64 } else { 100.0 }
}

/// A process's CPU time, user and system, in seconds: its CPU-time clock
/// (`clock_getcpuclockid`), which counts every thread's, the ones that have
/// ended too, to the nanosecond. `/proc/<pid>/stat` gives the same time in
/// clock ticks (10 ms), too coarse for a slow rate's few seconds.
pub fn process_cpu(pid: u32) -> anyhow::Result<f64> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `clock` is a valid place for the clock's id.
    let rc = unsafe { libc::clock_getcpuclockid(pid as libc::pid_t, &mut clock) };
    if rc != 0 {
        bail!(
            "the CPU-time clock of process {pid}: {}",
            std::io::Error::from_raw_os_error(rc)
        );
    }
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `now` is a valid timespec to write.
    if unsafe { libc::clock_gettime(clock, &mut now) } != 0 {
        return Err(std::io::Error::last_os_error())
            .with_context(|| format!("reading the CPU-time clock of process {pid}"));
    }
    Ok(now.tv_sec as f64 + now.tv_nsec as f64 / 1e9)
}

/// A process's memory now, in bytes.
#[derive(Debug, Clone, Default)]
pub struct Memory {
    /// Peak resident set size (VmHWM).
    pub peak_rss: u64,
    /// Resident set size now (VmRSS).
    pub rss: u64,
    /// Its BPF maps ([`bpf_map_memory`]).
    pub map_memory: u64,
    /// Of `peak_rss`, the maps' pages mapped into it ([`mapped_bpf_maps`]).
    pub maps_in_rss: u64,
}

impl Memory {
    pub fn of(pid: u32) -> anyhow::Result<Self> {
        Ok(Self {
            peak_rss: peak_rss(pid)?,
            rss: rss(pid)?,
            map_memory: bpf_map_memory(pid)?,
            maps_in_rss: mapped_bpf_maps(pid)?,
        })
    }
}

/// Peak resident set size (VmHWM), in bytes.
pub fn peak_rss(pid: u32) -> anyhow::Result<u64> {
    status_bytes(pid, "VmHWM:")
}

/// Resident set size now (VmRSS), in bytes.
pub fn rss(pid: u32) -> anyhow::Result<u64> {
    status_bytes(pid, "VmRSS:")
}

fn status_bytes(pid: u32, key: &str) -> anyhow::Result<u64> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/status"))
        .with_context(|| format!("reading /proc/{pid}/status"))?;
    let value = text
        .lines()
        .find_map(|l| l.strip_prefix(key))
        .with_context(|| format!("no {key} in /proc/{pid}/status"))?;
    kib_bytes(value).with_context(|| format!("{key} value"))
}

/// The bytes of a `/proc` field's value, which is in kB ("   12 kB").
fn kib_bytes(value: &str) -> Option<u64> {
    let kib: u64 = value.split_whitespace().next()?.parse().ok()?;
    Some(kib * 1024)
}

/// Memory of the BPF maps a process holds descriptors of (the `memlock`
/// of each distinct map in `/proc/<pid>/fdinfo`), in bytes.
pub fn bpf_map_memory(pid: u32) -> anyhow::Result<u64> {
    let mut maps: HashMap<u64, u64> = HashMap::new();
    let dir = format!("/proc/{pid}/fdinfo");
    for entry in std::fs::read_dir(&dir).with_context(|| format!("listing {dir}"))? {
        let Ok(text) = std::fs::read_to_string(entry?.path()) else {
            continue; // closed meanwhile
        };
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        if !text.lines().any(|l| l.starts_with("map_type:")) {
            continue;
        }
        if let (Some(id), Some(memlock)) = (field("map_id:"), field("memlock:")) {
            maps.insert(id, memlock);
        }
    }
    Ok(maps.values().sum())
}

/// Resident bytes of the BPF maps a process has mapped (`anon_inode:bpf-map`
/// in `/proc/<pid>/smaps`): pages its RSS counts that are the maps' own, so
/// already in [`bpf_map_memory`]. A ring buffer's data pages are mapped
/// twice (reads across the wrap-around are contiguous), so RSS counts them
/// twice as well.
pub fn mapped_bpf_maps(pid: u32) -> anyhow::Result<u64> {
    let path = format!("/proc/{pid}/smaps");
    let text = std::fs::read_to_string(&path).with_context(|| format!("reading {path}"))?;
    let mut in_map = false;
    let mut bytes = 0;
    for line in text.lines() {
        // A mapping's header starts with its address range; its fields
        // ("Rss:    12 kB") follow.
        if line
            .split_whitespace()
            .next()
            .is_some_and(|w| w.contains('-'))
        {
            in_map = line.ends_with("anon_inode:bpf-map");
        } else if in_map && let Some(value) = line.strip_prefix("Rss:") {
            bytes += kib_bytes(value).with_context(|| format!("{path}: {line}"))?;
        }
    }
    Ok(bytes)
}

/// System-wide CPU time from the `cpu` line of `/proc/stat`, in seconds.
#[derive(Debug, Clone, Copy, Default)]
pub struct SystemCpu {
    /// Everything but idle and iowait (user, nice, system, irq, softirq, steal).
    pub busy: f64,
    pub softirq: f64,
}

impl SystemCpu {
    pub fn read() -> anyhow::Result<Self> {
        let text = std::fs::read_to_string("/proc/stat").context("reading /proc/stat")?;
        let line = text
            .lines()
            .find(|l| l.starts_with("cpu "))
            .context("no cpu line in /proc/stat")?;
        let v: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .map(|n| n.parse().unwrap_or(0))
            .collect();
        if v.len() < 8 {
            bail!("short cpu line in /proc/stat: {line}");
        }
        let t = ticks_per_second();
        // user nice system idle iowait irq softirq steal (guest is in user).
        let busy = v[0] + v[1] + v[2] + v[5] + v[6] + v[7];
        Ok(Self {
            busy: busy as f64 / t,
            softirq: v[6] as f64 / t,
        })
    }

    pub fn since(self, before: Self) -> Self {
        Self {
            busy: self.busy - before.busy,
            softirq: self.softirq - before.softirq,
        }
    }
}

/// `/proc/loadavg`'s first three numbers.
pub fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|t| t.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_else(|_| "?".into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_this_process() {
        let me = std::process::id();
        assert!(process_cpu(me).unwrap() >= 0.0);
        // The high-water mark never falls, so it holds the RSS read before it.
        let now = rss(me).unwrap();
        assert!(peak_rss(me).unwrap() >= now);
        assert_eq!(bpf_map_memory(me).unwrap(), 0);
        assert_eq!(mapped_bpf_maps(me).unwrap(), 0);
        let a = SystemCpu::read().unwrap();
        assert!(a.busy > 0.0);
    }
}
