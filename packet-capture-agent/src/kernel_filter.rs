//! tcpdump filters in the kernel: libpcap's classic BPF, translated to
//! eBPF and loaded as a program of its own that the TC programs reach by
//! tail call.
//!
//! Why a translation and not an interpreter inside the TC programs: the
//! translated program is JIT-compiled like any other, so a filter costs
//! what tcpdump's costs in the kernel (which converts classic BPF the same
//! way for its socket filters), while an interpreter would pay a dispatch
//! per instruction and a verifier walk of every opcode on every path. Why a
//! tail call and not function replacement (`freplace`): a tail call needs
//! nothing but a program array (kernel 4.2+), where `freplace` needs BTF for
//! both programs and one stub per capture slot. The cost is at most two
//! tail calls per capture that has a filter (out to the filter, back to the
//! resume program, which a rejected packet nothing else wants never
//! needs), within the kernel's limit of 33 for up to 16 such
//! captures on one packet; past that, the rest are filtered in user space.
//! Both have constant indexes, which the JIT makes direct jumps (see
//! [`Ending::TailCall`]).
//!
//! The translation keeps libpcap's semantics (`bpf_filter`, which
//! `pcap_offline_filter` runs): A and X are 32-bit and start at zero; a
//! load past the end of the packet, or a division by zero, rejects the
//! packet; a shift by X of 32 or more gives zero. Loads read the packet
//! directly when the bytes are in its linear part, and through
//! `bpf_skb_load_bytes` otherwise (paged GSO frames).

use std::io;
use std::os::fd::{AsRawFd as _, BorrowedFd, FromRawFd as _, OwnedFd};

use packet_capture_common::abi::FilterState;

use crate::filter::ClassicInsn;

/// What a translated program does with its verdict.
#[derive(Clone, Copy)]
pub enum Ending<'a> {
    /// Tail-call the program at `resume` of `programs`, having cleared
    /// `slot`'s bit from the mask of the per-CPU `FilterState` in `state`
    /// and counted the packet in the slot's element of the per-CPU
    /// `filtered` when the filter rejects it. The index is a constant of
    /// the program, so the JIT makes the tail call a direct jump (patched
    /// when the array changes) instead of an indirect one, which costs a
    /// retpoline where the kernel mitigates Spectre v2.
    ///
    /// A rejected packet that no other slot wants and no other filter has
    /// to see ends here, without the way back, unless the `u64` at the
    /// start of the value of `diagnostics` (an array of one element) is
    /// set, when the resume program has the hook's diagnostics to run.
    TailCall {
        slot: u32,
        state: BorrowedFd<'a>,
        programs: BorrowedFd<'a>,
        resume: u32,
        filtered: BorrowedFd<'a>,
        diagnostics: BorrowedFd<'a>,
    },
    /// Return it: 0 rejects, anything else accepts (tests run programs
    /// like this with `BPF_PROG_TEST_RUN`).
    Return,
}

/// How the program reads the packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Access {
    /// Directly where the bytes are in the skb's linear part, through
    /// `bpf_skb_load_bytes` where they are not.
    Direct,
    /// Directly at constant offsets only; at X + k (an offset the packet
    /// decides) through `bpf_skb_load_bytes`: the verifier refuses a packet
    /// pointer plus a variable to a loader without CAP_PERFMON.
    ConstantOffsets,
    /// Always through `bpf_skb_load_bytes` (tests compare every way).
    Helper,
}

impl Access {
    /// From the fastest to what any loader with CAP_BPF may load.
    pub const PREFERRED: [Access; 2] = [Access::Direct, Access::ConstantOffsets];
}

/// Why a classic program cannot run in the kernel; the capture's filter
/// then runs in user space.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum Untranslatable {
    #[error("classic BPF instruction {pc} (opcode {code:#06x}) has no eBPF translation")]
    Opcode { pc: usize, code: u16 },
    #[error("classic BPF instruction {pc} jumps outside the program")]
    Jump { pc: usize },
    #[error("classic BPF instruction {pc} uses scratch memory word {k}, beyond the 16")]
    Memory { pc: usize, k: u32 },
    #[error("the classic program is empty")]
    Empty,
    #[error("the translated program has {0} instructions, too many to jump across")]
    TooLong(usize),
}

/// One eBPF instruction (`struct bpf_insn`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(C)]
pub struct Insn {
    code: u8,
    /// dst_reg in the low nibble, src_reg in the high one.
    regs: u8,
    off: i16,
    imm: i32,
}

/// Opcode parts shared by classic BPF and eBPF (same values), and eBPF's own.
mod op {
    pub const LD: u8 = 0x00;
    pub const LDX: u8 = 0x01;
    pub const ST: u8 = 0x02;
    pub const STX: u8 = 0x03;
    pub const ALU: u8 = 0x04;
    pub const JMP: u8 = 0x05;
    pub const RET: u8 = 0x06;
    pub const MISC: u8 = 0x07;
    /// eBPF only: 32-bit compares.
    pub const JMP32: u8 = 0x06;
    /// eBPF only: 64-bit arithmetic.
    pub const ALU64: u8 = 0x07;

    pub const W: u8 = 0x00;
    pub const H: u8 = 0x08;
    pub const B: u8 = 0x10;
    pub const DW: u8 = 0x18;

    pub const IMM: u8 = 0x00;
    pub const ABS: u8 = 0x20;
    pub const IND: u8 = 0x40;
    pub const MEM: u8 = 0x60;
    pub const LEN: u8 = 0x80;
    pub const MSH: u8 = 0xa0;

    pub const K: u8 = 0x00;
    pub const X: u8 = 0x08;
    /// Classic `ret a`.
    pub const RET_A: u8 = 0x10;

    pub const ADD: u8 = 0x00;
    pub const SUB: u8 = 0x10;
    pub const MUL: u8 = 0x20;
    pub const DIV: u8 = 0x30;
    pub const OR: u8 = 0x40;
    pub const AND: u8 = 0x50;
    pub const LSH: u8 = 0x60;
    pub const RSH: u8 = 0x70;
    pub const NEG: u8 = 0x80;
    pub const MOD: u8 = 0x90;
    pub const XOR: u8 = 0xa0;
    pub const MOV: u8 = 0xb0;
    /// eBPF byte swap; with `TO_BE`, host to big endian.
    pub const END: u8 = 0xd0;
    pub const TO_BE: u8 = 0x08;

    pub const JA: u8 = 0x00;
    pub const JEQ: u8 = 0x10;
    pub const JGT: u8 = 0x20;
    pub const JGE: u8 = 0x30;
    pub const JSET: u8 = 0x40;
    pub const JNE: u8 = 0x50;
    pub const CALL: u8 = 0x80;
    pub const EXIT: u8 = 0x90;

    /// Classic `tax` and `txa`.
    pub const TAX: u8 = 0x00;
    pub const TXA: u8 = 0x80;
}

/// Registers. R6-R9 survive helper calls, which clobber R0-R5.
const R0: u8 = 0;
const R1: u8 = 1;
const R2: u8 = 2;
const R3: u8 = 3;
const R4: u8 = 4;
/// The `__sk_buff`.
const CTX: u8 = 6;
const A: u8 = 7;
const X: u8 = 8;
/// What the program says of the packet (0: reject).
const VERDICT: u8 = 9;
const FP: u8 = 10;

/// Stack: classic scratch memory M[0..16] (4 bytes each) below an
/// 8-byte buffer for loads through the helper.
const SCRATCH: i16 = -72;
const BUFFER: i16 = -8;
/// A 4-byte map key, once the filter has run (in the buffer's place).
const KEY: i16 = -4;

/// `struct __sk_buff` fields (UAPI, stable).
const SKB_LEN: i16 = 0;
const SKB_DATA: i16 = 76;
const SKB_DATA_END: i16 = 80;

/// Helper numbers (UAPI).
const BPF_FUNC_MAP_LOOKUP_ELEM: i32 = 1;
const BPF_FUNC_TAIL_CALL: i32 = 12;
const BPF_FUNC_SKB_LOAD_BYTES: i32 = 26;
/// `ld_imm64` of a map by file descriptor.
const BPF_PSEUDO_MAP_FD: u8 = 1;
/// `ld_imm64` of an address in a map's value, by file descriptor.
const BPF_PSEUDO_MAP_VALUE: u8 = 2;
/// Largest offset the verifier allows from a packet pointer.
const MAX_PACKET_OFF: u32 = 0xffff;
/// `TC_ACT_UNSPEC`: what the TC programs return, whatever they saw.
const TC_ACT_UNSPEC: i32 = -1;

fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> Insn {
    Insn {
        code,
        regs: dst | (src << 4),
        off,
        imm,
    }
}

/// An instruction list with forward labels.
#[derive(Default)]
struct Asm {
    insns: Vec<Insn>,
    labels: Vec<Option<usize>>,
    /// (jump instruction, label) to resolve at the end.
    jumps: Vec<(usize, usize)>,
}

impl Asm {
    fn label(&mut self) -> usize {
        self.labels.push(None);
        self.labels.len() - 1
    }

    fn bind(&mut self, label: usize) {
        self.labels[label] = Some(self.insns.len());
    }

    fn push(&mut self, i: Insn) {
        self.insns.push(i);
    }

    /// A jump to `label`: `code` is class | op | source.
    fn jump(&mut self, code: u8, dst: u8, src: u8, imm: i32, label: usize) {
        self.jumps.push((self.insns.len(), label));
        self.push(insn(code, dst, src, 0, imm));
    }

    fn goto(&mut self, label: usize) {
        self.jump(op::JMP | op::JA, 0, 0, 0, label);
    }

    fn mov32_imm(&mut self, dst: u8, imm: i32) {
        self.push(insn(op::ALU | op::MOV | op::K, dst, 0, 0, imm));
    }

    fn mov64_reg(&mut self, dst: u8, src: u8) {
        self.push(insn(op::ALU64 | op::MOV | op::X, dst, src, 0, 0));
    }

    fn add64_imm(&mut self, dst: u8, imm: i32) {
        self.push(insn(op::ALU64 | op::ADD | op::K, dst, 0, 0, imm));
    }

    fn ld_map_fd(&mut self, dst: u8, fd: BorrowedFd<'_>) {
        self.push(insn(
            op::LD | op::DW | op::IMM,
            dst,
            BPF_PSEUDO_MAP_FD,
            0,
            fd.as_raw_fd(),
        ));
        self.push(insn(0, 0, 0, 0, 0));
    }

    /// `dst` = the address `offset` bytes into the value of the array map
    /// `fd`, which has one element.
    fn ld_map_value(&mut self, dst: u8, fd: BorrowedFd<'_>, offset: i32) {
        self.push(insn(
            op::LD | op::DW | op::IMM,
            dst,
            BPF_PSEUDO_MAP_VALUE,
            0,
            fd.as_raw_fd(),
        ));
        self.push(insn(0, 0, 0, 0, offset));
    }

    fn call(&mut self, helper: i32) {
        self.push(insn(op::JMP | op::CALL, 0, 0, 0, helper));
    }

    fn finish(self) -> Result<Vec<Insn>, Untranslatable> {
        let Self {
            mut insns,
            labels,
            jumps,
        } = self;
        for (at, label) in jumps {
            let target = labels[label].expect("every label used is bound");
            let off = target as i64 - at as i64 - 1;
            insns[at].off = i16::try_from(off).map_err(|_| Untranslatable::TooLong(insns.len()))?;
        }
        Ok(insns)
    }
}

/// Translates a classic program (as libpcap compiled it for one link type)
/// into an eBPF program for the TC hooks whose frames start with that link
/// type's header.
pub fn translate(
    classic: &[ClassicInsn],
    ending: Ending<'_>,
    access: Access,
) -> Result<Vec<Insn>, Untranslatable> {
    if classic.is_empty() {
        return Err(Untranslatable::Empty);
    }
    let reachable = reachable(classic)?;
    let mut asm = Asm::default();
    let at: Vec<usize> = (0..classic.len()).map(|_| asm.label()).collect();
    let done = asm.label();

    asm.mov64_reg(CTX, R1);
    // Classic scratch memory starts at zero; the verifier refuses a read of
    // stack never written. Most programs never read it: they pay nothing.
    let reads_scratch = classic.iter().zip(&reachable).any(|(i, &r)| {
        let code = i.code as u8;
        r && i.code <= 0xff && matches!(code & 0x07, op::LD | op::LDX) && code & 0xe0 == op::MEM
    });
    if reads_scratch {
        for word in 0..8 {
            asm.push(insn(
                op::ST | op::MEM | op::DW,
                FP,
                0,
                SCRATCH + 8 * word,
                0,
            ));
        }
    }
    asm.mov32_imm(A, 0);
    asm.mov32_imm(X, 0);

    for (pc, i) in classic.iter().enumerate() {
        if !reachable[pc] {
            continue;
        }
        asm.bind(at[pc]);
        let code = i.code as u8;
        let k = i.k;
        let untranslatable = Untranslatable::Opcode { pc, code: i.code };
        if i.code > 0xff {
            return Err(untranslatable);
        }
        let scratch = |k: u32| {
            if k < 16 {
                Ok(SCRATCH + 4 * k as i16)
            } else {
                Err(Untranslatable::Memory { pc, k })
            }
        };
        match code & 0x07 {
            op::LD | op::LDX => {
                let dst = if code & 0x07 == op::LD { A } else { X };
                let size = match code & 0x18 {
                    op::W => 4,
                    op::H => 2,
                    op::B => 1,
                    _ => return Err(untranslatable),
                };
                match (code & 0x07, code & 0xe0) {
                    (_, op::IMM) => asm.mov32_imm(dst, k as i32),
                    (_, op::LEN) => asm.push(insn(op::LDX | op::MEM | op::W, dst, CTX, SKB_LEN, 0)),
                    (_, op::MEM) => {
                        asm.push(insn(op::LDX | op::MEM | op::W, dst, FP, scratch(k)?, 0))
                    }
                    (op::LD, op::ABS) => load(&mut asm, access, dst, None, k, size, done),
                    (op::LD, op::IND) => load(&mut asm, access, dst, Some(X), k, size, done),
                    (op::LDX, op::MSH) if size == 1 => {
                        load(&mut asm, access, X, None, k, 1, done);
                        asm.push(insn(op::ALU | op::AND | op::K, X, 0, 0, 0xf));
                        asm.push(insn(op::ALU | op::LSH | op::K, X, 0, 0, 2));
                    }
                    _ => return Err(untranslatable),
                }
            }
            op::ST | op::STX => {
                let src = if code & 0x07 == op::ST { A } else { X };
                if code != op::ST && code != op::STX {
                    return Err(untranslatable);
                }
                asm.push(insn(op::STX | op::MEM | op::W, FP, src, scratch(k)?, 0));
            }
            op::ALU => alu(&mut asm, code, k, done).ok_or(untranslatable)?,
            op::JMP => {
                let target = |off: u32| at[pc + 1 + off as usize];
                let jop = code & 0xf0;
                if jop == op::JA {
                    if code != op::JMP | op::JA {
                        return Err(untranslatable);
                    }
                    asm.goto(target(k));
                    continue;
                }
                if !matches!(jop, op::JEQ | op::JGT | op::JGE | op::JSET) {
                    return Err(untranslatable);
                }
                let by_x = code & op::X != 0;
                let (src, imm) = if by_x { (X, 0) } else { (0, k as i32) };
                asm.jump(
                    op::JMP32 | jop | (code & op::X),
                    A,
                    src,
                    imm,
                    target(i.jt.into()),
                );
                asm.goto(target(i.jf.into()));
            }
            op::RET => {
                match code & 0x18 {
                    op::K => asm.mov32_imm(VERDICT, k as i32),
                    op::RET_A => asm.push(insn(op::ALU | op::MOV | op::X, VERDICT, A, 0, 0)),
                    op::X => asm.push(insn(op::ALU | op::MOV | op::X, VERDICT, X, 0, 0)),
                    _ => return Err(untranslatable),
                }
                asm.goto(done);
            }
            op::MISC => match code & 0xf8 {
                op::TAX => asm.push(insn(op::ALU | op::MOV | op::X, X, A, 0, 0)),
                op::TXA => asm.push(insn(op::ALU | op::MOV | op::X, A, X, 0, 0)),
                _ => return Err(untranslatable),
            },
            _ => return Err(untranslatable),
        }
        // A classic instruction that falls through must not fall off the
        // end: `reachable` checked that it has a successor.
    }

    asm.bind(done);
    match ending {
        Ending::Return => {
            asm.push(insn(op::ALU | op::MOV | op::X, R0, VERDICT, 0, 0));
            asm.push(insn(op::JMP | op::EXIT, 0, 0, 0, 0));
        }
        Ending::TailCall {
            slot,
            state,
            programs,
            resume,
            filtered,
            diagnostics,
        } => {
            let field = |offset: usize| offset as i16;
            let exit = asm.label();
            let back = asm.label();
            // Accepted: the state stays as the hook left it.
            asm.jump(op::JMP | op::JNE | op::K, VERDICT, 0, 0, back);
            // Rejected: the slot's bit leaves the mask (the key, 0, of the
            // one per-CPU element).
            asm.push(insn(op::ST | op::MEM | op::W, FP, 0, KEY, 0));
            asm.mov64_reg(R2, FP);
            asm.add64_imm(R2, KEY.into());
            asm.ld_map_fd(R1, state);
            asm.call(BPF_FUNC_MAP_LOOKUP_ELEM);
            asm.jump(op::JMP | op::JEQ | op::K, R0, 0, 0, exit);
            let mask = field(std::mem::offset_of!(FilterState, mask));
            asm.push(insn(op::LDX | op::MEM | op::DW, A, R0, mask, 0));
            asm.push(insn(op::ALU64 | op::MOV | op::K, R1, 0, 0, 1));
            asm.push(insn(op::ALU64 | op::LSH | op::K, R1, 0, 0, slot as i32));
            asm.push(insn(op::ALU64 | op::XOR | op::K, R1, 0, 0, -1));
            asm.push(insn(op::ALU64 | op::AND | op::X, A, R1, 0, 0));
            asm.push(insn(op::STX | op::MEM | op::DW, R0, A, mask, 0));
            // A: what another slot still wants or has to filter, which
            // survives the counter's lookup.
            let pending = field(std::mem::offset_of!(FilterState, pending));
            asm.push(insn(op::LDX | op::MEM | op::DW, R1, R0, pending, 0));
            asm.push(insn(op::ALU64 | op::OR | op::X, A, R1, 0, 0));
            asm.push(insn(op::ST | op::MEM | op::W, FP, 0, KEY, slot as i32));
            asm.mov64_reg(R2, FP);
            asm.add64_imm(R2, KEY.into());
            asm.ld_map_fd(R1, filtered);
            asm.call(BPF_FUNC_MAP_LOOKUP_ELEM);
            let counted = asm.label();
            asm.jump(op::JMP | op::JEQ | op::K, R0, 0, 0, counted);
            asm.push(insn(op::LDX | op::MEM | op::DW, R1, R0, 0, 0));
            asm.add64_imm(R1, 1);
            asm.push(insn(op::STX | op::MEM | op::DW, R0, R1, 0, 0));
            asm.bind(counted);
            asm.jump(op::JMP | op::JNE | op::K, A, 0, 0, back);
            // Nothing else to do for the packet but the hook's diagnostics,
            // which the resume program runs when they are on.
            asm.ld_map_value(R2, diagnostics, 0);
            asm.push(insn(op::LDX | op::MEM | op::DW, R2, R2, 0, 0));
            asm.jump(op::JMP | op::JEQ | op::K, R2, 0, 0, exit);
            asm.bind(back);
            asm.push(insn(op::ALU64 | op::MOV | op::K, R3, 0, 0, resume as i32));
            asm.mov64_reg(R1, CTX);
            asm.ld_map_fd(R2, programs);
            asm.call(BPF_FUNC_TAIL_CALL);
            // Only when the resume program is gone (the agent is unloading).
            asm.bind(exit);
            asm.push(insn(op::ALU64 | op::MOV | op::K, R0, 0, 0, TC_ACT_UNSPEC));
            asm.push(insn(op::JMP | op::EXIT, 0, 0, 0, 0));
        }
    }
    asm.finish()
}

/// Which classic instructions some path from the first reaches (the
/// verifier refuses unreachable code); every jump must land inside the
/// program and no instruction but a return or a jump may be the last.
fn reachable(classic: &[ClassicInsn]) -> Result<Vec<bool>, Untranslatable> {
    let mut seen = vec![false; classic.len()];
    seen[0] = true;
    // Classic jumps only go forward, so one pass in order finds them all.
    for pc in 0..classic.len() {
        if !seen[pc] {
            continue;
        }
        let i = &classic[pc];
        let code = i.code as u8;
        let next: Vec<usize> = match code & 0x07 {
            op::RET => vec![],
            op::JMP if code & 0xf0 == op::JA => vec![pc + 1 + i.k as usize],
            op::JMP => vec![pc + 1 + usize::from(i.jt), pc + 1 + usize::from(i.jf)],
            _ => vec![pc + 1],
        };
        for n in next {
            if n >= classic.len() {
                return Err(Untranslatable::Jump { pc });
            }
            seen[n] = true;
        }
    }
    Ok(seen)
}

/// Loads `size` bytes at `k` (plus X when `index` is set) into `dst`, in
/// host order; past the end of the packet, rejects it.
fn load(asm: &mut Asm, access: Access, dst: u8, index: Option<u8>, k: u32, size: u32, done: usize) {
    let slow = asm.label();
    let next = asm.label();
    let fits_directly = match (access, index) {
        (Access::Helper, _) | (Access::ConstantOffsets, Some(_)) => false,
        (_, None) => k.checked_add(size).is_some_and(|end| end <= MAX_PACKET_OFF),
        (Access::Direct, Some(_)) => k <= MAX_PACKET_OFF,
    };
    if fits_directly {
        // R2 = a packet pointer and `offset` what the load adds to it; R1 =
        // the end of the load, compared with the packet's end.
        let mut offset = 0;
        match index {
            None => {
                // A load's own offset is 16 bits, signed: a larger k moves
                // R2 instead.
                let (moved, rest) = if k <= i16::MAX as u32 { (0, k) } else { (k, 0) };
                asm.push(insn(op::LDX | op::MEM | op::W, R2, CTX, SKB_DATA, 0));
                if moved > 0 {
                    asm.add64_imm(R2, moved as i32);
                }
                asm.mov64_reg(R1, R2);
                asm.add64_imm(R1, (rest + size) as i32);
                offset = rest as i16;
            }
            Some(x) => {
                asm.mov64_reg(R1, x);
                asm.add64_imm(R1, k as i32);
                asm.jump(
                    op::JMP | op::JGT | op::K,
                    R1,
                    0,
                    (MAX_PACKET_OFF - size) as i32,
                    slow,
                );
                asm.push(insn(op::LDX | op::MEM | op::W, R2, CTX, SKB_DATA, 0));
                asm.push(insn(op::ALU64 | op::ADD | op::X, R2, R1, 0, 0));
                asm.mov64_reg(R1, R2);
                asm.add64_imm(R1, size as i32);
            }
        }
        asm.push(insn(op::LDX | op::MEM | op::W, R3, CTX, SKB_DATA_END, 0));
        asm.jump(op::JMP | op::JGT | op::X, R1, R3, 0, slow);
        asm.push(insn(
            op::LDX | op::MEM | size_code(size),
            dst,
            R2,
            offset,
            0,
        ));
        to_host(asm, dst, size);
        asm.goto(next);
    }
    asm.bind(slow);
    // R2 = offset; past 32 bits (X + k overflowing) it is past the end.
    match index {
        None => asm.mov32_imm(R2, k as i32),
        Some(x) => {
            asm.mov64_reg(R2, x);
            // k may not fit a sign-extended immediate: add it as 32 bits
            // into R3, then 64-bit.
            asm.mov32_imm(R3, k as i32);
            asm.push(insn(op::ALU64 | op::ADD | op::X, R2, R3, 0, 0));
            asm.mov32_imm(R3, -1);
            let reject = asm.label();
            let fits = asm.label();
            asm.jump(op::JMP | op::JGT | op::X, R2, R3, 0, reject);
            asm.goto(fits);
            asm.bind(reject);
            asm.mov32_imm(VERDICT, 0);
            asm.goto(done);
            asm.bind(fits);
        }
    }
    asm.mov64_reg(R1, CTX);
    asm.mov64_reg(R3, FP);
    asm.add64_imm(R3, BUFFER.into());
    asm.mov32_imm(R4, size as i32);
    asm.call(BPF_FUNC_SKB_LOAD_BYTES);
    let loaded = asm.label();
    asm.jump(op::JMP | op::JEQ | op::K, R0, 0, 0, loaded);
    asm.mov32_imm(VERDICT, 0);
    asm.goto(done);
    asm.bind(loaded);
    asm.push(insn(
        op::LDX | op::MEM | size_code(size),
        dst,
        FP,
        BUFFER,
        0,
    ));
    to_host(asm, dst, size);
    asm.bind(next);
}

fn size_code(size: u32) -> u8 {
    match size {
        4 => op::W,
        2 => op::H,
        _ => op::B,
    }
}

/// Packet bytes are big-endian; A and X hold numbers.
fn to_host(asm: &mut Asm, dst: u8, size: u32) {
    if size > 1 {
        asm.push(insn(
            op::ALU | op::END | op::TO_BE,
            dst,
            0,
            0,
            (size * 8) as i32,
        ));
    }
}

/// A classic ALU instruction on A; `None` if it has no translation.
fn alu(asm: &mut Asm, code: u8, k: u32, done: usize) -> Option<()> {
    let aop = code & 0xf0;
    let by_x = code & op::X != 0;
    match aop {
        op::NEG => {
            asm.push(insn(op::ALU | op::NEG, A, 0, 0, 0));
            return Some(());
        }
        op::ADD | op::SUB | op::MUL | op::OR | op::AND | op::XOR => {}
        op::DIV | op::MOD => {
            // libpcap's bpf_filter rejects the packet on a division by
            // zero; eBPF would give 0 (or A).
            if by_x {
                let nonzero = asm.label();
                asm.jump(op::JMP32 | op::JNE | op::K, X, 0, 0, nonzero);
                asm.mov32_imm(VERDICT, 0);
                asm.goto(done);
                asm.bind(nonzero);
            } else if k == 0 {
                asm.mov32_imm(VERDICT, 0);
                asm.goto(done);
                return Some(());
            }
        }
        op::LSH | op::RSH => {
            if by_x {
                // libpcap: a shift by 32 or more gives 0 (eBPF would shift
                // by X mod 32).
                let past_31 = asm.label();
                let shifted = asm.label();
                asm.jump(op::JMP32 | op::JGT | op::K, X, 0, 31, past_31);
                asm.push(insn(op::ALU | aop | op::X, A, X, 0, 0));
                asm.goto(shifted);
                asm.bind(past_31);
                asm.mov32_imm(A, 0);
                asm.bind(shifted);
                return Some(());
            } else if k > 31 {
                return None;
            }
        }
        _ => return None,
    }
    if by_x {
        asm.push(insn(op::ALU | aop | op::X, A, X, 0, 0));
    } else {
        asm.push(insn(op::ALU | aop | op::K, A, 0, 0, k as i32));
    }
    Some(())
}

/// A loaded eBPF program, unloaded when dropped (unless a program array
/// still holds it).
#[derive(Debug)]
pub struct Program(OwnedFd);

impl Program {
    pub fn fd(&self) -> BorrowedFd<'_> {
        use std::os::fd::AsFd as _;
        self.0.as_fd()
    }

    /// Runs the program once on `frame` as the TC hooks would (the frame
    /// starts where `skb->data` does, at least 14 bytes) and returns what
    /// it returns.
    pub fn test_run(&self, frame: &[u8]) -> io::Result<u32> {
        #[repr(C)]
        #[derive(Default)]
        struct TestRun {
            prog_fd: u32,
            retval: u32,
            data_size_in: u32,
            data_size_out: u32,
            data_in: u64,
            data_out: u64,
            repeat: u32,
            duration: u32,
        }
        let mut attr = TestRun {
            prog_fd: self.0.as_raw_fd() as u32,
            data_size_in: frame.len() as u32,
            data_in: frame.as_ptr() as u64,
            repeat: 1,
            ..Default::default()
        };
        // SAFETY: the attribute block outlives the call and points at
        // `frame`, which the kernel only reads.
        bpf(BPF_PROG_TEST_RUN, &mut attr)?;
        Ok(attr.retval)
    }
}

const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TEST_RUN: libc::c_long = 10;
const BPF_PROG_TYPE_SCHED_CLS: u32 = 3;

/// The bpf(2) system call with an attribute block of type `T`.
fn bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised attribute block of the size
    // given; the kernel reads (and for some commands writes) only that.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            std::ptr::from_mut(attr),
            std::mem::size_of::<T>(),
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Loads `insns` as a TC classifier named `name` (at most 15 bytes kept).
/// A refusal carries the end of the verifier's log.
pub fn load_program(insns: &[Insn], name: &str) -> io::Result<Program> {
    #[repr(C)]
    #[derive(Default)]
    struct ProgLoad {
        prog_type: u32,
        insn_cnt: u32,
        insns: u64,
        license: u64,
        log_level: u32,
        log_size: u32,
        log_buf: u64,
        kern_version: u32,
        prog_flags: u32,
        prog_name: [u8; 16],
    }
    let license = c"GPL";
    let mut prog_name = [0u8; 16];
    for (to, from) in prog_name.iter_mut().zip(name.bytes().take(15)) {
        *to = from;
    }
    let attempt = |log: &mut Vec<u8>| {
        let mut attr = ProgLoad {
            prog_type: BPF_PROG_TYPE_SCHED_CLS,
            insn_cnt: insns.len() as u32,
            insns: insns.as_ptr() as u64,
            license: license.as_ptr() as u64,
            log_level: u32::from(!log.is_empty()),
            log_size: log.len() as u32,
            // No buffer at all without a log: the kernel refuses a pointer
            // with a size of 0.
            log_buf: if log.is_empty() {
                0
            } else {
                log.as_mut_ptr() as u64
            },
            prog_name,
            ..Default::default()
        };
        bpf(BPF_PROG_LOAD, &mut attr)
    };
    match attempt(&mut Vec::new()) {
        // SAFETY: a new descriptor the kernel handed to us alone.
        Ok(fd) => Ok(Program(unsafe { OwnedFd::from_raw_fd(fd as i32) })),
        Err(first) => {
            // Again with the verifier's log, to say why.
            let mut log = vec![0u8; 1 << 20];
            let _ = attempt(&mut log);
            let text = String::from_utf8_lossy(&log);
            let text = text.trim_end_matches('\0').trim_end();
            let tail: Vec<&str> = text.lines().rev().take(6).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            Err(io::Error::new(
                first.kind(),
                format!("{first}; verifier: {}", tail.join(" | ")),
            ))
        }
    }
}

/// Points entry `index` of the program array `map` at `program`, or
/// clears it (`None`); clearing an empty entry is not an error.
pub fn set_program_array(
    map: BorrowedFd<'_>,
    index: u32,
    program: Option<BorrowedFd<'_>>,
) -> io::Result<()> {
    #[repr(C)]
    #[derive(Default)]
    struct MapElem {
        map_fd: u32,
        _pad: u32,
        key: u64,
        value: u64,
        flags: u64,
    }
    let value = program.map(|p| p.as_raw_fd() as u32);
    let mut attr = MapElem {
        map_fd: map.as_raw_fd() as u32,
        key: std::ptr::from_ref(&index) as u64,
        value: value.as_ref().map_or(0, |v| std::ptr::from_ref(v) as u64),
        ..Default::default()
    };
    match value {
        Some(_) => bpf(BPF_MAP_UPDATE_ELEM, &mut attr).map(drop),
        None => match bpf(BPF_MAP_DELETE_ELEM, &mut attr) {
            Err(e) if e.raw_os_error() == Some(libc::ENOENT) => Ok(()),
            other => other.map(drop),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn classic(code: u16, jt: u8, jf: u8, k: u32) -> ClassicInsn {
        ClassicInsn { code, jt, jf, k }
    }

    #[test]
    fn unreachable_instructions_are_left_out_and_bad_jumps_refused() {
        // ret #1; ret #0 (never reached)
        let prog = [classic(0x06, 0, 0, 1), classic(0x06, 0, 0, 0)];
        let ebpf = translate(&prog, Ending::Return, Access::Direct).unwrap();
        assert!(
            !ebpf
                .iter()
                .any(|i| i.code == op::ALU | op::MOV && i.imm == 0 && i.regs == VERDICT),
            "{ebpf:?}"
        );
        let jump_out = [classic(0x15, 0, 5, 0x800), classic(0x06, 0, 0, 1)];
        assert_eq!(
            translate(&jump_out, Ending::Return, Access::Direct),
            Err(Untranslatable::Jump { pc: 0 })
        );
        let falls_off = [classic(0x28, 0, 0, 12)];
        assert_eq!(
            translate(&falls_off, Ending::Return, Access::Direct),
            Err(Untranslatable::Jump { pc: 0 })
        );
        assert_eq!(
            translate(&[], Ending::Return, Access::Direct),
            Err(Untranslatable::Empty)
        );
    }

    #[test]
    fn what_has_no_translation_is_named() {
        // st M[16]
        let prog = [classic(0x02, 0, 0, 16), classic(0x06, 0, 0, 1)];
        assert_eq!(
            translate(&prog, Ending::Return, Access::Direct),
            Err(Untranslatable::Memory { pc: 0, k: 16 })
        );
        // lsh #32
        let prog = [classic(0x64, 0, 0, 32), classic(0x06, 0, 0, 1)];
        assert_eq!(
            translate(&prog, Ending::Return, Access::Direct),
            Err(Untranslatable::Opcode { pc: 0, code: 0x64 })
        );
    }
}
