//! The traffic generator: UDP frames built here and sent with an AF_PACKET
//! socket that bypasses the qdisc (`PACKET_QDISC_BYPASS`), in batches with
//! `sendmmsg`, from one thread pinned to one CPU inside the sender's network
//! namespace. Every payload starts with a 64-bit sequence number (big
//! endian), counted from 0 in each run.

use std::ffi::CString;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context as _, bail};

/// Ethernet + IPv4 + UDP headers.
pub const HEADERS_LEN: usize = 14 + 20 + 8;
/// Smallest frame that carries a sequence number.
pub const MIN_FRAME: usize = 60;
/// Frames per `sendmmsg` when unthrottled.
const MAX_BATCH: usize = 64;
/// Source port of every frame.
pub const SOURCE_PORT: u16 = 40_000;

/// Where the frames go.
#[derive(Debug, Clone)]
pub struct Flow {
    /// The sender's interface (inside the sender's namespace).
    pub iface: String,
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src_ip: Ipv4Addr,
    pub dst_ip: Ipv4Addr,
    pub dst_port: u16,
}

/// How fast to send.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Rate {
    /// Packets per second, paced.
    Pps(u64),
    /// As fast as the generator goes.
    #[default]
    Max,
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Pps(p) if p % 1000 == 0 => write!(f, "{}k", p / 1000),
            Self::Pps(p) => write!(f, "{p}"),
            Self::Max => f.write_str("max"),
        }
    }
}

/// What the generator did.
#[derive(Debug, Clone, Copy, Default)]
pub struct Sent {
    /// Frames the kernel accepted.
    pub packets: u64,
    /// Frames refused (ENOBUFS and the like).
    pub refused: u64,
    pub elapsed: Duration,
}

impl Sent {
    pub fn pps(&self) -> f64 {
        self.packets as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

/// When a run of the generator ends.
#[derive(Debug, Clone, Copy)]
pub enum Until<'a> {
    /// After this long.
    Elapsed(Duration),
    /// When the flood is stopped; meanwhile it counts what it sends.
    Stopped(&'a Flood),
}

impl Until<'_> {
    /// The longest the run can last.
    fn limit(self) -> Duration {
        match self {
            Self::Elapsed(d) => d,
            Self::Stopped(_) => Duration::MAX,
        }
    }
}

/// A generator run that others watch and end: the frames sent so far (the
/// kernel took them, and on a veth that means the receive path has run for
/// them), and the flag that stops it.
#[derive(Debug, Default)]
pub struct Flood {
    sent: AtomicU64,
    stop: AtomicBool,
}

impl Flood {
    pub fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// One frame of `len` bytes (at least [`MIN_FRAME`]) with sequence number
/// 0; the payload after the number is pseudo-random from `seed`, so that
/// compressing a capture is not flattered by runs of zeros.
pub fn frame(flow: &Flow, len: usize, seed: u64) -> Vec<u8> {
    assert!(len >= MIN_FRAME, "frames are at least {MIN_FRAME} bytes");
    let mut f = Vec::with_capacity(len);
    f.extend_from_slice(&flow.dst_mac);
    f.extend_from_slice(&flow.src_mac);
    f.extend_from_slice(&0x0800u16.to_be_bytes());
    let ip_len = (len - 14) as u16;
    let mut ip = [0u8; 20];
    ip[0] = 0x45;
    ip[2..4].copy_from_slice(&ip_len.to_be_bytes());
    ip[6] = 0x40; // don't fragment
    ip[8] = 64;
    ip[9] = 17;
    ip[12..16].copy_from_slice(&flow.src_ip.octets());
    ip[16..20].copy_from_slice(&flow.dst_ip.octets());
    let sum = ipv4_checksum(&ip);
    ip[10..12].copy_from_slice(&sum.to_be_bytes());
    f.extend_from_slice(&ip);
    f.extend_from_slice(&SOURCE_PORT.to_be_bytes());
    f.extend_from_slice(&flow.dst_port.to_be_bytes());
    f.extend_from_slice(&(ip_len - 20).to_be_bytes());
    f.extend_from_slice(&0u16.to_be_bytes()); // no UDP checksum (IPv4)
    f.extend_from_slice(&0u64.to_be_bytes());
    let mut x: u64 =
        0x9e37_79b9_7f4a_7c15 ^ (len as u64) ^ seed.wrapping_mul(0x2545_f491_4f6c_dd1d);
    while f.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        f.push(x as u8);
    }
    f
}

fn ipv4_checksum(header: &[u8]) -> u16 {
    let mut sum: u32 = header
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while sum > 0xffff {
        sum = (sum & 0xffff) + (sum >> 16);
    }
    !(sum as u16)
}

/// The sequence number a frame carries, if it is one of ours to `port`.
pub fn sequence(frame: &[u8], port: u16) -> Option<u64> {
    if frame.len() < HEADERS_LEN + 8 || frame[12..14] != [0x08, 0x00] || frame[23] != 17 {
        return None;
    }
    let ihl = usize::from(frame[14] & 0x0f) * 4;
    let udp = 14 + ihl;
    let payload = udp + 8;
    if frame.len() < payload + 8 || frame[udp + 2..udp + 4] != port.to_be_bytes() {
        return None;
    }
    Some(u64::from_be_bytes(
        frame[payload..payload + 8].try_into().expect("8 bytes"),
    ))
}

/// Sends `frame_len`-byte frames of `flow` at `rate` from the calling
/// thread, which must already be in the sender's namespace, until `until`.
pub fn send(
    flow: &Flow,
    frame_len: usize,
    rate: Rate,
    until: Until<'_>,
    cpu: usize,
) -> anyhow::Result<Sent> {
    pin_to(cpu)?;
    // Wake-ups of the pacing sleep as close to their time as the timer allows.
    // SAFETY: prctl with integer arguments.
    unsafe { libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong) };
    let socket = packet_socket(&flow.iface)?;
    let seq_at = HEADERS_LEN;
    // One buffer per message of a batch, each with its own payload.
    let mut frames: Vec<Vec<u8>> = (0..MAX_BATCH)
        .map(|i| frame(flow, frame_len, i as u64))
        .collect();
    let mut iovecs: Vec<libc::iovec> = frames
        .iter_mut()
        .map(|f| libc::iovec {
            iov_base: f.as_mut_ptr().cast(),
            iov_len: f.len(),
        })
        .collect();
    let mut headers: Vec<libc::mmsghdr> = iovecs
        .iter_mut()
        .map(|iov| {
            // SAFETY: an all-zero msghdr is valid (no name, no control).
            let mut h: libc::mmsghdr = unsafe { std::mem::zeroed() };
            h.msg_hdr.msg_iov = iov;
            h.msg_hdr.msg_iovlen = 1;
            h
        })
        .collect();
    let mut sent = Sent::default();
    let start = Instant::now();
    loop {
        let now = Instant::now();
        let over = match until {
            Until::Elapsed(d) => now - start >= d,
            Until::Stopped(flood) => {
                flood.sent.store(sent.packets, Ordering::Relaxed);
                flood.stop.load(Ordering::Relaxed)
            }
        };
        if over {
            break;
        }
        let batch = match rate {
            Rate::Max => MAX_BATCH,
            Rate::Pps(pps) => {
                let due = (now - start).as_secs_f64() * pps as f64;
                let behind = due as u64 - (sent.packets + sent.refused).min(due as u64);
                if behind == 0 {
                    // Pacing: sleep until the next frame is due.
                    let next = (sent.packets + sent.refused + 1) as f64 / pps as f64;
                    sleep_until(start + Duration::from_secs_f64(next).min(until.limit()));
                    continue;
                }
                (behind as usize).min(MAX_BATCH)
            }
        };
        let first = sent.packets + sent.refused;
        for (i, f) in frames.iter_mut().take(batch).enumerate() {
            f[seq_at..seq_at + 8].copy_from_slice(&(first + i as u64).to_be_bytes());
        }
        // SAFETY: `batch` headers pointing at live buffers.
        let n =
            unsafe { libc::sendmmsg(socket.as_raw_fd(), headers.as_mut_ptr(), batch as u32, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            match e.raw_os_error() {
                // The frame at the head of the batch was dropped on the way;
                // its number is used up, the next call goes on after it.
                Some(libc::ENOBUFS | libc::EAGAIN) => sent.refused += 1,
                Some(libc::EINTR) => {}
                _ => return Err(e).context("sendmmsg"),
            }
            continue;
        }
        let n = n as u64;
        sent.packets += n;
        if (n as usize) < batch {
            // The next frame was refused: skip its number.
            sent.refused += 1;
        }
    }
    sent.elapsed = start.elapsed();
    Ok(sent)
}

fn sleep_until(at: Instant) {
    let now = Instant::now();
    if at > now {
        std::thread::sleep(at - now);
    }
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) -> anyhow::Result<()> {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET writes inside it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    unsafe { libc::CPU_SET(cpu, &mut set) };
    // SAFETY: pid 0 is the calling thread; the set is ours.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context(format!("pinning to CPU {cpu}"));
    }
    Ok(())
}

/// An AF_PACKET raw socket bound to `iface` that sends past the qdisc and
/// receives nothing (protocol 0).
fn packet_socket(iface: &str) -> anyhow::Result<OwnedFd> {
    // SAFETY: socket(2) returns a new descriptor, owned right away.
    let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
    if raw < 0 {
        return Err(std::io::Error::last_os_error()).context("AF_PACKET socket (needs root)");
    }
    // SAFETY: a fresh descriptor nobody else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    let name = CString::new(iface).context("interface name")?;
    // SAFETY: a NUL-terminated name.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        bail!("no interface {iface} in the sender's namespace");
    }
    let one: libc::c_int = 1;
    setsockopt(&fd, libc::SOL_PACKET, libc::PACKET_QDISC_BYPASS, one)
        .context("PACKET_QDISC_BYPASS")?;
    setsockopt(&fd, libc::SOL_SOCKET, libc::SO_SNDBUF, 4 << 20).context("SO_SNDBUF")?;
    // SAFETY: an all-zero sockaddr_ll, then its fields.
    let mut addr: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    addr.sll_family = libc::AF_PACKET as u16;
    addr.sll_ifindex = index as i32;
    addr.sll_protocol = 0;
    // SAFETY: a sockaddr_ll of its own size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&addr as *const libc::sockaddr_ll).cast(),
            std::mem::size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error()).context(format!("binding to {iface}"));
    }
    Ok(fd)
}

fn setsockopt(fd: &OwnedFd, level: i32, name: i32, value: libc::c_int) -> std::io::Result<()> {
    // SAFETY: an int option of its own size.
    let rc = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            level,
            name,
            (&value as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as u32,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow() -> Flow {
        Flow {
            iface: "x".into(),
            src_mac: [2, 0, 0, 0, 0, 1],
            dst_mac: [2, 0, 0, 0, 0, 2],
            src_ip: Ipv4Addr::new(10, 0, 0, 1),
            dst_ip: Ipv4Addr::new(10, 0, 0, 2),
            dst_port: 5555,
        }
    }

    #[test]
    fn frames_carry_their_sequence_number() {
        for len in [60, 1442] {
            let mut f = frame(&flow(), len, 3);
            assert_eq!(f.len(), len);
            assert_eq!(u16::from_be_bytes([f[16], f[17]]) as usize, len - 14);
            assert_eq!(ipv4_checksum(&f[14..34]), 0, "the IPv4 checksum verifies");
            f[HEADERS_LEN..HEADERS_LEN + 8].copy_from_slice(&77u64.to_be_bytes());
            assert_eq!(sequence(&f, 5555), Some(77));
            assert_eq!(sequence(&f, 5556), None);
            assert_eq!(sequence(&f[..40], 5555), None);
        }
        assert_eq!(Rate::Pps(25_000).to_string(), "25k");
        assert_eq!(Rate::Max.to_string(), "max");
    }
}
