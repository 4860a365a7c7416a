//! SYN cookies at the edge of the kernel: a spoofed-source SYN flood is answered here, before
//! the kernel allocates anything, instead of by the listener's own SYN cookies.
//!
//! Each protected port counts the SYNs it gets from sources the source table does not hold (a
//! spoofed flood's sources are all new). Above `SyncookiePolicy::threshold` a second, or always
//! under `SYNCOOKIES_ALWAYS`, the port is in SYN-cookie mode for `SYNCOOKIE_HOLD_NS` more:
//! - a SYN from a new source is answered with a SYN-ACK built in place of the SYN and sent back
//!   out (`XDP_TX`); its sequence number is a cookie from the kernel's own generator
//!   (`bpf_tcp_raw_gen_syncookie_*`), so the kernel can check it later. The source takes no slot
//!   in the source table: a spoofed source never comes back.
//! - an ACK from a new source must carry a valid cookie (`bpf_tcp_raw_check_syncookie_*`):
//!   then the source takes a slot and the ACK goes on to the listener, which creates the
//!   connection from the cookie itself; else it is dropped.
//! - one SYN per port a second still goes to the kernel: a listener accepts cookie ACKs only for
//!   two minutes after it last answered a SYN with a cookie of its own
//!   (`tcp_synq_no_recent_overflow`), which with `net.ipv4.tcp_syncookies = 2` it does for every
//!   SYN it gets.
//!
//! The SYN-ACK offers what the listener will assume when it creates the connection: our MSS,
//! the window and window scale the kernel computes, and (when the host's sysctls allow, see
//! `SyncookiePolicy::options`) timestamps, whose low six bits carry the client's window scale
//! and SACK permission back in the echo, as the kernel's own cookies do. Its checksums are
//! computed in full: a frame sent with `XDP_TX` gets no checksum offload. The SYN's own
//! checksum is not checked: from a veth peer on the same host it is only the pseudo-header's
//! (checksum offload), and a SYN with a bad one costs a SYN-ACK, as any spoofed SYN does. On a
//! veth, `XDP_TX` delivers only when the peer has NAPI on (an XDP program or GRO there).
use aya_ebpf::bindings::{iphdr, ipv6hdr, tcphdr};
use aya_ebpf::helpers::generated::{
    bpf_ktime_get_ns, bpf_loop, bpf_tcp_raw_check_syncookie_ipv4, bpf_tcp_raw_check_syncookie_ipv6,
    bpf_tcp_raw_gen_syncookie_ipv4, bpf_tcp_raw_gen_syncookie_ipv6, bpf_xdp_adjust_tail,
};
use aya_ebpf::maps::LruHashMap;
use aya_ebpf::programs::XdpContext;
use proxy_common::{
    Reason, SYNCOOKIE_HOLD_NS, SYNCOOKIE_SACK, SYNCOOKIE_TIMESTAMPS, SYNCOOKIE_WSCALE, SYNCOOKIES_ADAPTIVE,
    SYNCOOKIES_ALWAYS, SynFlood, SyncookiePolicy,
};

use crate::parse::{Segment, TCP_ACK, TCP_RST, TCP_SYN, bounded_mut};
use crate::police::NewSource;

const ETH_ADDRS_LEN: usize = 12;
const IPV4_HDR_LEN: usize = 20;
const IPV6_HDR_LEN: usize = 40;
const TCP_MIN_HDR_LEN: usize = 20;
/// The longest TCP header: the cookie generator reads the SYN's whole header, so the frame is
/// first made at least this long after it, whatever the SYN's length.
const TCP_MAX_HDR_LEN: usize = 60;
/// The SYN-ACK's TCP header: 20 bytes, MSS (4), SACK permitted or two NOPs and timestamps
/// (12), a NOP and window scale (4).
const SYNACK_MAX_LEN: usize = 40;
const IPPROTO_TCP: u8 = 6;
const NS_PER_SEC: u64 = 1_000_000_000;
const NS_PER_MS: u64 = 1_000_000;

const TCPOPT_EOL: u8 = 0;
const TCPOPT_NOP: u8 = 1;
const TCPOPT_MSS: u8 = 2;
const TCPOPT_WINDOW: u8 = 3;
const TCPOPT_SACK_PERM: u8 = 4;
const TCPOPT_TIMESTAMP: u8 = 8;
/// Low bits of a cookie timestamp: window scale (4 bits, 15 for none), then SACK permitted.
const TS_OPT_BITS: u64 = 6;
const TS_OPT_WSCALE_NONE: u64 = 0xf;
const TS_OPT_SACK: u64 = 1 << 4;
const TCP_MAX_WSCALE: u8 = 14;
/// The options copied out of a SYN (40 bytes at most), with room for a read of 6 bytes at any
/// cursor position below 64.
const OPTIONS_BUFFER: usize = 70;

/// Decides what a segment from a source the table does not hold gets at a port with SYN-flood
/// state `flood`, counting it when it is a SYN. Only segments with the fixed IP header are
/// answered or checked here; `listeners` holds when each listener last got a SYN.
#[inline(always)]
pub fn decide<F: Family>(
    ctx: &XdpContext,
    segment: Segment,
    flood: *mut SynFlood,
    listeners: &LruHashMap<[u64; 3], u64>,
    policy: &SyncookiePolicy,
    flags: u8,
) -> NewSource {
    let kind = flags & (TCP_SYN | TCP_ACK | TCP_RST);
    let syn = kind == TCP_SYN;
    if !syn && kind != TCP_ACK {
        return NewSource::Police;
    }
    // SAFETY: an array slot, valid while the program runs; concurrent updates from other CPUs
    // are tolerated (see `SynFlood`).
    let state = unsafe { &mut *flood };
    let now = crate::police::coarse_now();
    let cookies = match policy.mode {
        SYNCOOKIES_ALWAYS => true,
        SYNCOOKIES_ADAPTIVE => {
            if syn {
                if now.wrapping_sub(state.window_ns) >= NS_PER_SEC {
                    state.window_ns = now;
                    state.new_source_syns = 0;
                }
                state.new_source_syns += 1;
                if state.new_source_syns > policy.threshold {
                    state.cookies_until_ns = now + SYNCOOKIE_HOLD_NS;
                }
            }
            now < state.cookies_until_ns
        }
        _ => false,
    };
    if !cookies || !segment.plain {
        // A segment with IP options or extension headers (no real client sends one) goes to
        // the kernel, which answers or checks it with its own cookies.
        return NewSource::Police;
    }
    if !syn {
        return NewSource::CheckCookie;
    }
    // One SYN a while goes to each listener, which answers it with a cookie of its own: that
    // keeps it accepting the ACKs of ours.
    let Some(listener) = F::listener(ctx, segment) else {
        return NewSource::Police;
    };
    // SAFETY: the value is copied out at once.
    let last = unsafe { listeners.get(listener) }.copied().unwrap_or(0);
    if last == 0 || now.wrapping_sub(last) >= policy.listener_interval_ns {
        let _ = listeners.insert(listener, now, 0);
        return NewSource::Police;
    }
    NewSource::Answer
}

/// An address family's cookie work: how its SYNs are answered and its ACKs checked.
pub trait Family {
    /// IP header length of a plain segment.
    const IP_HDR_LEN: usize;

    /// Answers the SYN at `segment` in place with a SYN-ACK carrying a cookie:
    /// [`Reason::SyncookieSent`], or [`Reason::Pass`] when it cannot (the kernel answers then).
    fn answer(ctx: &XdpContext, segment: Segment, policy: &SyncookiePolicy) -> Reason;

    /// Whether the ACK at `segment` carries a cookie the kernel issued for its connection.
    fn valid(ctx: &XdpContext, segment: Segment) -> bool;

    /// The listener a plain segment is for, as `SYN_LISTENERS` keys it.
    fn listener(ctx: &XdpContext, segment: Segment) -> Option<[u64; 3]>;
}

/// IPv4.
pub struct V4;
/// IPv6.
pub struct V6;

impl Family for V4 {
    const IP_HDR_LEN: usize = IPV4_HDR_LEN;

    #[inline(always)]
    fn answer(ctx: &XdpContext, segment: Segment, policy: &SyncookiePolicy) -> Reason {
        let Some(syn) = Syn::read::<Self>(ctx, segment, |ip, tcp, len| {
            // SAFETY: `ip` and `tcp` point at a bounded 20-byte IP header and at `len` (the
            // SYN's own header length, at most 60) bounded bytes, as the helper requires.
            unsafe { bpf_tcp_raw_gen_syncookie_ipv4(ip as *mut iphdr, tcp as *mut tcphdr, len) }
        }) else {
            return Reason::Pass;
        };
        if !swap_ethernet_addresses(ctx) {
            return Reason::Pass;
        }
        let Some(ip) = headers::<Self>(ctx, segment, SYNACK_MAX_LEN) else {
            return Reason::Pass;
        };
        let header = synack_header(&syn, policy, policy.mss_v4, policy.window_v4);
        let tcp_len = header.len;
        // SAFETY (all below): `headers` proved the 20 IP header bytes lie in the frame.
        let (source, destination) = unsafe { (read_u32(ip, 12), read_u32(ip, 16)) };
        unsafe {
            *ip.add(1) = 0; // TOS
            write_be16(ip, 2, (IPV4_HDR_LEN + tcp_len) as u16);
            write_be16(ip, 4, 0); // ID: with DF, RFC 6864
            write_be16(ip, 6, 0x4000); // DF, no fragment offset
            *ip.add(8) = policy.ttl;
            write_be16(ip, 10, 0);
            write_u32(ip, 12, destination);
            write_u32(ip, 16, source);
            let mut sum = 0u64;
            for word in 0..IPV4_HDR_LEN / 2 {
                sum += u64::from((ip.add(2 * word) as *const u16).read_unaligned());
            }
            (ip.add(10) as *mut u16).write_unaligned(fold(sum));
        }
        // Pseudo-header: addresses (as now written: ours first), protocol, TCP length.
        let pseudo = sum_words32(destination)
            + sum_words32(source)
            + u64::from(u16::from_ne_bytes([0, IPPROTO_TCP]))
            + u64::from((tcp_len as u16).to_be());
        // SAFETY: `headers` bounded 40 bytes after the IP header.
        let tcp = unsafe { ip.add(IPV4_HDR_LEN) };
        finish(ctx, tcp, header, pseudo, segment.l3 + IPV4_HDR_LEN)
    }

    #[inline(always)]
    fn valid(ctx: &XdpContext, segment: Segment) -> bool {
        let Some(ip) = headers::<Self>(ctx, segment, TCP_MIN_HDR_LEN) else {
            return false;
        };
        // SAFETY: `headers` bounded the IP header and the 20 TCP header bytes after it, what
        // the helper reads.
        unsafe {
            bpf_tcp_raw_check_syncookie_ipv4(ip as *mut iphdr, ip.add(IPV4_HDR_LEN) as *mut tcphdr) == 0
        }
    }

    #[inline(always)]
    fn listener(ctx: &XdpContext, segment: Segment) -> Option<[u64; 3]> {
        let ip = bounded_mut(ctx, segment.l3, IPV4_HDR_LEN)?;
        // SAFETY: the 20 header bytes are bounded.
        let destination = unsafe { read_u32(ip, 16) };
        Some([u64::from(destination), 0, u64::from(segment.port)])
    }
}

impl Family for V6 {
    const IP_HDR_LEN: usize = IPV6_HDR_LEN;

    #[inline(always)]
    fn answer(ctx: &XdpContext, segment: Segment, policy: &SyncookiePolicy) -> Reason {
        let Some(syn) = Syn::read::<Self>(ctx, segment, |ip, tcp, len| {
            // SAFETY: as for IPv4, with the 40-byte IPv6 header.
            unsafe { bpf_tcp_raw_gen_syncookie_ipv6(ip as *mut ipv6hdr, tcp as *mut tcphdr, len) }
        }) else {
            return Reason::Pass;
        };
        if !swap_ethernet_addresses(ctx) {
            return Reason::Pass;
        }
        let Some(ip) = headers::<Self>(ctx, segment, SYNACK_MAX_LEN) else {
            return Reason::Pass;
        };
        let header = synack_header(&syn, policy, policy.mss_v6, policy.window_v6);
        let tcp_len = header.len;
        let mut pseudo =
            u64::from((tcp_len as u16).to_be()) + u64::from(u16::from_ne_bytes([0, IPPROTO_TCP]));
        // SAFETY (all below): `headers` proved the 40 IP header bytes lie in the frame.
        unsafe {
            write_u32(ip, 0, u32::from_be(0x6000_0000)); // version 6, no traffic class or flow label
            write_be16(ip, 4, tcp_len as u16);
            *ip.add(7) = policy.ttl;
            for word in 0..4 {
                let source = read_u32(ip, 8 + 4 * word);
                let destination = read_u32(ip, 24 + 4 * word);
                write_u32(ip, 8 + 4 * word, destination);
                write_u32(ip, 24 + 4 * word, source);
                pseudo += sum_words32(source) + sum_words32(destination);
            }
        }
        // SAFETY: `headers` bounded 40 bytes after the IP header.
        let tcp = unsafe { ip.add(IPV6_HDR_LEN) };
        finish(ctx, tcp, header, pseudo, segment.l3 + IPV6_HDR_LEN)
    }

    #[inline(always)]
    fn valid(ctx: &XdpContext, segment: Segment) -> bool {
        let Some(ip) = headers::<Self>(ctx, segment, TCP_MIN_HDR_LEN) else {
            return false;
        };
        // SAFETY: as for IPv4.
        unsafe {
            bpf_tcp_raw_check_syncookie_ipv6(ip as *mut ipv6hdr, ip.add(IPV6_HDR_LEN) as *mut tcphdr) == 0
        }
    }

    #[inline(always)]
    fn listener(ctx: &XdpContext, segment: Segment) -> Option<[u64; 3]> {
        let ip = bounded_mut(ctx, segment.l3, IPV6_HDR_LEN)?;
        // SAFETY: the 40 header bytes are bounded.
        let (high, low) = unsafe {
            (
                (ip.add(24) as *const u64).read_unaligned(),
                (ip.add(32) as *const u64).read_unaligned(),
            )
        };
        Some([high, low, u64::from(segment.port) | 1 << 16])
    }
}

/// The fixed IP header of a plain segment and `tcp_len` bytes after it, checked as one range:
/// the verifier keeps a range per checked pointer, so the TCP header must be reached from the
/// IP header's pointer by a constant.
#[inline(always)]
fn headers<F: Family>(ctx: &XdpContext, segment: Segment, tcp_len: usize) -> Option<*mut u8> {
    bounded_mut(ctx, segment.l3, F::IP_HDR_LEN + tcp_len)
}

/// Swaps the frame's Ethernet source and destination. Done before the IP and TCP headers are
/// touched: checked after their bounds, LLVM would find this check implied by those and drop
/// it, and the verifier cannot follow that inference.
#[inline(always)]
fn swap_ethernet_addresses(ctx: &XdpContext) -> bool {
    let Some(eth) = bounded_mut(ctx, 0, ETH_ADDRS_LEN) else {
        return false;
    };
    // SAFETY: `eth` is bounded to the 12 address bytes.
    unsafe {
        let destination = (eth as *const [u8; 6]).read_unaligned();
        let source = (eth.add(6) as *const [u8; 6]).read_unaligned();
        (eth as *mut [u8; 6]).write_unaligned(source);
        (eth.add(6) as *mut [u8; 6]).write_unaligned(destination);
    }
    true
}

/// What the SYN-ACK needs from the SYN.
struct Syn {
    cookie: u32,
    /// The client's ports and sequence number, as on the wire.
    source_port: u16,
    destination_port: u16,
    seq: u32,
    /// The client's timestamp value (as on the wire), if it sent the option.
    tsval: Option<u32>,
    /// The window scale it asked for, if any.
    wscale: Option<u8>,
    sack: bool,
}

impl Syn {
    /// Makes room for the longest TCP header after the SYN's, has `generate` compute the cookie
    /// over the IP and TCP headers, and reads the rest.
    #[inline(always)]
    fn read<F: Family>(
        ctx: &XdpContext,
        segment: Segment,
        generate: impl FnOnce(*mut u8, *mut u8, u32) -> i64,
    ) -> Option<Self> {
        let frame_len = ctx.data_end() - ctx.data();
        let room = segment.l3 + F::IP_HDR_LEN + TCP_MAX_HDR_LEN;
        if room > frame_len {
            // SAFETY: the context is the program's own; the kernel checks the new length.
            if unsafe { bpf_xdp_adjust_tail(ctx.ctx, (room - frame_len) as i32) } != 0 {
                return None;
            }
        }
        let ip = headers::<F>(ctx, segment, TCP_MAX_HDR_LEN)?;
        // SAFETY: `headers` bounded 60 bytes after the IP header.
        let tcp = unsafe { ip.add(F::IP_HDR_LEN) };
        // SAFETY (these reads): `tcp` is bounded to 60 bytes.
        let len = usize::from(unsafe { *tcp.add(12) } >> 4) * 4;
        if len < TCP_MIN_HDR_LEN {
            return None;
        }
        let cookie = generate(ip, tcp, len as u32);
        if cookie < 0 {
            return None;
        }
        let mut syn = Syn {
            cookie: cookie as u32,
            source_port: unsafe { (tcp as *const u16).read_unaligned() },
            destination_port: unsafe { (tcp.add(2) as *const u16).read_unaligned() },
            seq: unsafe { read_u32(tcp, 4) },
            tsval: None,
            wscale: None,
            sack: false,
        };
        // The options, copied to the stack with whole words past the header's end zeroed (an
        // end of the list), then walked by `walk_step`.
        let mut walk = Walk {
            options: [0u8; OPTIONS_BUFFER],
            cursor: 0,
            tsval: 0,
            wscale: 0,
            seen: 0,
        };
        for word in 0..(TCP_MAX_HDR_LEN - TCP_MIN_HDR_LEN) / 4 {
            let start = TCP_MIN_HDR_LEN + 4 * word;
            // All ones when the word lies inside the header (`len` is a multiple of 4), else 0.
            let inside = ((start as i64 + 3 - len as i64) >> 63) as u32;
            let value = unsafe { read_u32(tcp, start) } & inside;
            walk.options[4 * word..4 * word + 4].copy_from_slice(&value.to_ne_bytes());
        }
        // SAFETY: `walk_step` takes the `Walk` passed here, which outlives the call.
        unsafe {
            bpf_loop(
                (TCP_MAX_HDR_LEN - TCP_MIN_HDR_LEN) as u32,
                walk_step as *mut core::ffi::c_void,
                (&raw mut walk).cast(),
                0,
            );
        }
        syn.tsval = (walk.seen & SEEN_TIMESTAMP != 0).then_some(walk.tsval);
        syn.wscale = (walk.seen & SEEN_WSCALE != 0).then_some(walk.wscale);
        syn.sack = walk.seen & SEEN_SACK != 0;
        Some(syn)
    }
}

/// The option walk's state, on the stack of the program, shared with [`walk_step`].
#[repr(C)]
struct Walk {
    /// The SYN's options, zero past their end, with room for a read of 6 bytes at any
    /// position the cursor can take.
    options: [u8; OPTIONS_BUFFER],
    /// Where the next option starts (always below 64).
    cursor: u64,
    /// The timestamp value, as on the wire, when `seen & SEEN_TIMESTAMP`.
    tsval: u32,
    /// The window scale asked for, when `seen & SEEN_WSCALE`.
    wscale: u8,
    /// `SEEN_*` bits.
    seen: u8,
}

const SEEN_TIMESTAMP: u8 = 1;
const SEEN_WSCALE: u8 = 2;
const SEEN_SACK: u8 = 4;

/// One step of the walk over a SYN's options (a `bpf_loop` callback): reads the option at the
/// cursor, moves past it; returns 1 to stop (end of list, malformed length), 0 to go on. The
/// verifier checks a `bpf_loop` body until its states repeat, not once per step, which is
/// what keeps a walk of up to 40 options within its limits.
#[inline(never)]
extern "C" fn walk_step(_index: u64, walk: *mut core::ffi::c_void) -> i64 {
    // SAFETY: `bpf_loop` passes the `Walk` the program gave it.
    let walk = unsafe { &mut *(walk as *mut Walk) };
    let at = (walk.cursor & 63) as usize;
    let kind = walk.options[at];
    if kind == TCPOPT_EOL {
        return 1;
    }
    if kind == TCPOPT_NOP {
        walk.cursor = ((at + 1) & 63) as u64;
        return 0;
    }
    let size = walk.options[at + 1];
    if size < 2 {
        return 1;
    }
    match (kind, size) {
        (TCPOPT_WINDOW, 3) => {
            walk.wscale = walk.options[at + 2];
            walk.seen |= SEEN_WSCALE;
        }
        (TCPOPT_SACK_PERM, 2) => walk.seen |= SEEN_SACK,
        (TCPOPT_TIMESTAMP, 10) => {
            // Byte by byte: merged into one 4-byte load at a position known only to lie in 0..64,
            // the load would be misaligned, which the verifier refuses on the stack.
            // SAFETY: reads of initialized bytes of `options`, in bounds (`at` < 64).
            let byte = |i: usize| unsafe { core::ptr::read_volatile(&walk.options[at + i]) };
            walk.tsval = u32::from_ne_bytes([byte(2), byte(3), byte(4), byte(5)]);
            walk.seen |= SEEN_TIMESTAMP;
        }
        _ => {}
    }
    walk.cursor = ((at + usize::from(size)) & 63) as u64;
    0
}

/// The SYN-ACK's TCP header, as 32-bit words in wire order, and how many bytes of it count.
struct SynAckHeader {
    words: [u32; SYNACK_MAX_LEN / 4],
    len: usize,
}

/// Builds the SYN-ACK for `syn`: the cookie as our sequence number, and the options the kernel
/// will assume (see the module docs); its checksum is left at 0.
#[inline(always)]
fn synack_header(syn: &Syn, policy: &SyncookiePolicy, mss: u16, window: u16) -> SynAckHeader {
    let mut words = [0u32; SYNACK_MAX_LEN / 4];
    let be = |bytes: [u8; 4]| u32::from_ne_bytes(bytes);
    let [sp0, sp1] = syn.destination_port.to_ne_bytes();
    let [dp0, dp1] = syn.source_port.to_ne_bytes();
    words[0] = be([sp0, sp1, dp0, dp1]);
    words[1] = syn.cookie.to_be();
    words[2] = (u32::from_be(syn.seq).wrapping_add(1)).to_be();
    let [w0, w1] = window.to_be_bytes();
    let [m0, m1] = mss.to_be_bytes();
    // words[4]: checksum and urgent pointer, 0 until `finish`.
    words[5] = be([TCPOPT_MSS, 4, m0, m1]);
    let mut len = 6; // words: 5 of header and the MSS option
    if let Some(tsecr) = syn.tsval
        && policy.options & SYNCOOKIE_TIMESTAMPS != 0
    {
        let wscale = syn.wscale.filter(|_| policy.options & SYNCOOKIE_WSCALE != 0);
        let sack = syn.sack && policy.options & SYNCOOKIE_SACK != 0;
        let mut options = match wscale {
            Some(scale) => u64::from(scale.min(TCP_MAX_WSCALE)),
            None => TS_OPT_WSCALE_NONE,
        };
        if sack {
            options |= TS_OPT_SACK;
        }
        // As the kernel's `cookie_init_timestamp`: the clock in ms with the options in its low
        // bits, never ahead of the clock (its later timestamps must not go backwards).
        // SAFETY: helper without preconditions.
        let now = unsafe { bpf_ktime_get_ns() } / NS_PER_MS;
        let mut tsval = ((now >> TS_OPT_BITS) << TS_OPT_BITS) | options;
        if tsval > now {
            tsval -= 1 << TS_OPT_BITS;
        }
        words[6] = if sack {
            be([TCPOPT_SACK_PERM, 2, TCPOPT_TIMESTAMP, 10])
        } else {
            be([TCPOPT_NOP, TCPOPT_NOP, TCPOPT_TIMESTAMP, 10])
        };
        words[7] = (tsval as u32).to_be();
        words[8] = tsecr;
        len = 9;
        if wscale.is_some() {
            words[9] = be([TCPOPT_NOP, TCPOPT_WINDOW, 3, policy.wscale]);
            len = 10;
        }
    }
    let data_offset = (len as u8) << 4;
    words[3] = be([data_offset, TCP_SYN | TCP_ACK, w0, w1]);
    SynAckHeader { words, len: len * 4 }
}

/// Writes `header` at `tcp` (the SYN's TCP header, 40 bounded bytes) with its checksum
/// (`pseudo`: the pseudo-header's sum), and trims the frame to the SYN-ACK's end (`l4`: where
/// the TCP header starts in the frame).
#[inline(always)]
fn finish(ctx: &XdpContext, tcp: *mut u8, header: SynAckHeader, pseudo: u64, l4: usize) -> Reason {
    let SynAckHeader { mut words, len } = header;
    let mut sum = pseudo;
    for word in words {
        sum += u64::from(word & 0xffff) + u64::from(word >> 16);
    }
    // The checksum field: bytes 16-17, the first half of word 4 in memory order (the urgent
    // pointer after it stays 0).
    let [c0, c1] = fold(sum).to_ne_bytes();
    words[4] = u32::from_ne_bytes([c0, c1, 0, 0]);
    // SAFETY: the caller bounded 40 bytes at `tcp`.
    unsafe {
        for (i, word) in words.iter().enumerate() {
            write_u32(tcp, 4 * i, *word);
        }
    }
    let end = l4 + len;
    let frame_len = ctx.data_end() - ctx.data();
    if end < frame_len {
        // SAFETY: the context is the program's own; shrinking only drops bytes past the SYN-ACK.
        if unsafe { bpf_xdp_adjust_tail(ctx.ctx, -((frame_len - end) as i32)) } != 0 {
            return Reason::Pass;
        }
    }
    Reason::SyncookieSent
}

/// The one's complement sum of the two 16-bit halves of a word as it lies in memory.
#[inline(always)]
fn sum_words32(word: u32) -> u64 {
    let [a, b, c, d] = word.to_ne_bytes();
    u64::from(u16::from_ne_bytes([a, b])) + u64::from(u16::from_ne_bytes([c, d]))
}

/// Folds a one's complement sum to 16 bits and complements it: the checksum to store (in
/// memory order, like the words summed).
#[inline(always)]
fn fold(mut sum: u64) -> u16 {
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    sum = (sum & 0xffff) + (sum >> 16);
    !(sum as u16)
}

/// # Safety
/// `base + offset .. base + offset + 4` must lie inside the frame.
#[inline(always)]
unsafe fn read_u32(base: *const u8, offset: usize) -> u32 {
    // SAFETY: the caller guarantees the bounds.
    unsafe { (base.add(offset) as *const u32).read_unaligned() }
}

/// # Safety
/// `base + offset .. base + offset + 4` must lie inside the frame.
#[inline(always)]
unsafe fn write_u32(base: *mut u8, offset: usize, value: u32) {
    // SAFETY: the caller guarantees the bounds.
    unsafe { (base.add(offset) as *mut u32).write_unaligned(value) }
}

/// # Safety
/// `base + offset .. base + offset + 2` must lie inside the frame.
#[inline(always)]
unsafe fn write_be16(base: *mut u8, offset: usize, value: u16) {
    // SAFETY: the caller guarantees the bounds.
    unsafe { (base.add(offset) as *mut u16).write_unaligned(value.to_be()) }
}
