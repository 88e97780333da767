//! Frames sent exactly as given out of an interface, through a packet
//! socket in the calling thread's namespace: for frames the stack would
//! never build, such as one too short for its headers.

use std::os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd};

pub struct PacketSocket {
    fd: OwnedFd,
    to: libc::sockaddr_ll,
}

impl PacketSocket {
    /// A socket that sends out of `iface`; the frames say they carry
    /// `ethertype` (what the kernel takes for `skb->protocol`).
    pub fn open(iface: &str, ethertype: u16) -> Self {
        let name = std::ffi::CString::new(iface).expect("an interface name");
        // SAFETY: if_nametoindex reads a NUL-terminated string.
        let ifindex = unsafe { libc::if_nametoindex(name.as_ptr()) };
        assert!(ifindex > 0, "no interface {iface}");
        // SAFETY: socket(2); the descriptor is owned right away.
        let raw = unsafe { libc::socket(libc::AF_PACKET, libc::SOCK_RAW | libc::SOCK_CLOEXEC, 0) };
        assert!(
            raw >= 0,
            "packet socket: {}",
            std::io::Error::last_os_error()
        );
        // SAFETY: a fresh descriptor nobody else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        // SAFETY: sockaddr_ll is plain data; zero is a valid start.
        let mut to: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
        to.sll_family = libc::AF_PACKET as u16;
        to.sll_protocol = ethertype.to_be();
        to.sll_ifindex = ifindex as i32;
        Self { fd, to }
    }

    /// Sends `frame` (from its Ethernet header on) once.
    pub fn send(&self, frame: &[u8]) {
        // SAFETY: sendto with a buffer and an address we own, of the sizes given.
        let n = unsafe {
            libc::sendto(
                self.fd.as_raw_fd(),
                frame.as_ptr().cast(),
                frame.len(),
                0,
                (&raw const self.to).cast(),
                size_of::<libc::sockaddr_ll>() as u32,
            )
        };
        assert_eq!(
            usize::try_from(n).ok(),
            Some(frame.len()),
            "sending a {}-byte frame: {}",
            frame.len(),
            std::io::Error::last_os_error()
        );
    }
}

/// An Ethernet frame of `len` bytes that says it carries IPv4 but ends
/// before the 20 bytes of an IPv4 header (`len` under 34).
pub fn short_ipv4_frame(len: usize) -> Vec<u8> {
    assert!(
        (14..34).contains(&len),
        "{len} bytes is not a short IPv4 frame"
    );
    let mut frame = vec![0xff; 6];
    frame.extend_from_slice(&[0x02, 0, 0, 0, 0, 1]);
    frame.extend_from_slice(&0x0800u16.to_be_bytes());
    frame.resize(len, 0x45);
    frame
}
