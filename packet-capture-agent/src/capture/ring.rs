//! The reading side of the programs' ring buffer (`BPF_MAP_TYPE_RINGBUF`).
//!
//! The kernel reads the consumer position on every reservation, from the
//! CPU that receives the packet. A reader that publishes it after every
//! record (as aya's does) moves that cache line to the other CPU and back
//! once per packet, which the receiving CPU pays for in softirq. This one
//! gives space back in steps of a sixteenth of the ring, and whenever it
//! finds the ring empty, so the programs see the line change a few times
//! per ring's worth of records.
//!
//! Layout (`kernel/bpf/ringbuf.c`): a page holding the consumer position,
//! which user space writes; then a page holding the producer position and
//! the data pages mapped twice in a row, so a record that wraps around
//! reads contiguously, all read-only. Each record starts with an 8-byte
//! header: its length with a busy and a discard bit.

use std::io;
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

use aya::maps::MapData;

use crate::mmap::Mapping;

/// `BPF_RINGBUF_BUSY_BIT`: reserved, not yet submitted or discarded.
const BUSY: u32 = 1 << 31;
/// `BPF_RINGBUF_DISCARD_BIT`: discarded by the program, skipped.
const DISCARD: u32 = 1 << 30;
/// `BPF_RINGBUF_HDR_SZ`; it also keeps records 8-byte aligned.
const HEADER: u64 = 8;

pub struct Ring {
    map: MapData,
    consumer: Mapping,
    producer: Mapping,
    page: usize,
    mask: u64,
    /// Where the next record starts.
    pos: u64,
    /// The consumer position the kernel was last given: the bytes before it
    /// may be written again.
    released: u64,
    /// The producer position last read; records before it are whole or busy.
    produced: u64,
    /// Bytes read before the reader gives them back.
    release_step: u64,
}

impl Ring {
    /// Maps the ring `map` of `bytes` bytes (a power of two, a multiple of
    /// the page size).
    pub fn new(map: MapData, bytes: u32) -> io::Result<Self> {
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let bytes = u64::from(bytes);
        let fd = map.fd().as_fd();
        let consumer = Mapping::new(fd, page, libc::PROT_READ | libc::PROT_WRITE, 0)?;
        let producer = Mapping::new(fd, page + 2 * bytes as usize, libc::PROT_READ, page)?;
        let mut ring = Self {
            map,
            consumer,
            producer,
            page,
            mask: bytes - 1,
            pos: 0,
            released: 0,
            produced: 0,
            release_step: bytes / 16,
        };
        // A map used before (never ours, but cheap to honour) starts where
        // its consumer left it.
        ring.pos = ring.consumer_pos().load(Ordering::Acquire);
        ring.released = ring.pos;
        ring.produced = ring.producer_pos().load(Ordering::Acquire);
        Ok(ring)
    }

    /// The ring's size: at most this many bytes of records wait in it.
    pub fn bytes(&self) -> u64 {
        self.mask + 1
    }

    /// Bytes of records read since the map was created, discarded ones
    /// included.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Whether the last [`Ring::next`] that found no record found the ring
    /// empty, rather than stopped at a record still being written.
    pub fn is_empty(&self) -> bool {
        self.pos == self.produced
    }

    /// The next submitted record, or `None` when the ring holds none whole
    /// (then every byte read has been given back). The record stays valid
    /// until the next call.
    pub fn next(&mut self) -> Option<&[u8]> {
        loop {
            if self.pos - self.released >= self.release_step {
                self.release();
            }
            if self.pos == self.produced {
                self.release();
                // The kernel decides on wake-ups from both positions: make
                // sure it sees this one before the reader decides the ring
                // is empty and sleeps.
                fence(Ordering::SeqCst);
                self.produced = self.producer_pos().load(Ordering::Acquire);
                if self.pos == self.produced {
                    return None;
                }
            }
            let offset = self.page + (self.pos & self.mask) as usize;
            // SAFETY: offset < page + ring size, inside the mapping, and
            // records are 8-byte aligned; the kernel writes this header
            // with atomics, and submits with a fully ordered exchange that
            // this acquire load pairs with.
            let header =
                unsafe { (*self.producer.at(offset).cast::<AtomicU32>()).load(Ordering::Acquire) };
            if header & BUSY != 0 {
                // Reserved and not yet submitted: later records wait behind
                // it, as the kernel's own reader makes them.
                self.release();
                return None;
            }
            let len = u64::from(header & !(BUSY | DISCARD));
            self.pos += (HEADER + len).next_multiple_of(8);
            if header & DISCARD == 0 {
                let data = offset + HEADER as usize;
                // SAFETY: a record is at most the ring's size, and the data
                // pages are mapped twice in a row, so [data, data + len) is
                // inside the mapping. The kernel writes there again only
                // once the consumer position passes the record, at the
                // earliest in the next call.
                return Some(unsafe {
                    std::slice::from_raw_parts(self.producer.at(data), len as usize)
                });
            }
        }
    }

    /// Tells the kernel that everything before the read position may be
    /// written again.
    fn release(&mut self) {
        if self.released != self.pos {
            self.consumer_pos().store(self.pos, Ordering::Release);
            self.released = self.pos;
        }
    }

    fn consumer_pos(&self) -> &AtomicU64 {
        // SAFETY: the first word of the consumer page, aligned, shared with
        // the kernel, which only reads it.
        unsafe { &*self.consumer.at(0).cast::<AtomicU64>() }
    }

    fn producer_pos(&self) -> &AtomicU64 {
        // SAFETY: the first word of the producer page, aligned; the kernel
        // writes it with release stores.
        unsafe { &*self.producer.at(0).cast::<AtomicU64>() }
    }
}

impl AsRawFd for Ring {
    fn as_raw_fd(&self) -> std::os::fd::RawFd {
        self.map.fd().as_fd().as_raw_fd()
    }
}
