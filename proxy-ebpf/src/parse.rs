//! Header parsing: Ethernet (with up to two 802.1Q / 802.1ad tags), IPv4, IPv6 (walking up to
//! [`MAX_EXT_HEADERS`] extension headers), TCP. Decides everything that needs no state:
//! what is not ours to police, what is malformed, which fragments and flag combinations go.
//!
//! Every packet access goes through [`bounded`], an explicit `data + off + len <= data_end`
//! check the verifier can follow. Fixed-offset fields are read under one check per header
//! before any length computed from the packet is compared, so LLVM cannot fold a constant
//! bound into a later variable one the verifier cannot use.
use aya_ebpf::programs::XdpContext;
use proxy_common::Reason;

const ETH_HDR_LEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const ETH_P_IPV6: u16 = 0x86DD;
const ETH_P_8021Q: u16 = 0x8100;
const ETH_P_8021AD: u16 = 0x88A8;
const VLAN_HDR_LEN: usize = 4;

const IPV4_MIN_HDR_LEN: usize = 20;
const IPV4_MF: u16 = 0x2000;
const IPV4_OFFSET_MASK: u16 = 0x1FFF;
const IPV6_HDR_LEN: usize = 40;
const IPPROTO_TCP: u8 = 6;
const IPV6_HOPOPTS: u8 = 0;
const IPV6_ROUTING: u8 = 43;
const IPV6_FRAGMENT: u8 = 44;
const IPV6_DSTOPTS: u8 = 60;
const IPV6_FRAG_OFFSET_MASK: u16 = 0xFFF8;
/// Extension headers walked before the TCP header must show up; a longer chain is dropped.
pub const MAX_EXT_HEADERS: usize = 4;
/// Packets whose TCP header would start further in are dropped (keeps offsets bounded).
const MAX_L4_OFFSET: usize = 1024;

const TCP_MIN_HDR_LEN: usize = 20;
pub const TCP_FIN: u8 = 0x01;
pub const TCP_SYN: u8 = 0x02;
pub const TCP_RST: u8 = 0x04;
pub const TCP_PSH: u8 = 0x08;
pub const TCP_ACK: u8 = 0x10;
pub const TCP_URG: u8 = 0x20;

/// The source of a packet to a protected port: its octets as on the wire, read as native
/// integers (see `police::Address`).
pub enum Source {
    V4(u32),
    V6([u64; 2]),
}

/// Where a well-formed TCP segment's headers are (offsets from the frame's start).
#[derive(Clone, Copy)]
pub struct Segment {
    /// Start of the IP header.
    pub l3: usize,
    /// The IP header is the fixed one (IPv4 without options, IPv6 without extension headers):
    /// the SYN-cookie path answers only such SYNs in place and leaves the rest to the kernel.
    pub plain: bool,
    /// Destination port.
    pub port: u16,
}

/// What parsing decided.
pub enum Parsed {
    /// A verdict that needs no per-source state.
    Verdict(Reason),
    /// A well-formed TCP segment to a protected port: police its source.
    Police {
        source: Source,
        flags: u8,
        segment: Segment,
    },
}

use Parsed::Verdict;

/// Parses the frame in `ctx`. `protected` says whether a destination port is policed.
#[inline(always)]
pub fn parse(ctx: &XdpContext, protected: impl Fn(u16) -> bool) -> Parsed {
    let Some(mut ether_type) = read_u16_be(ctx, 12) else {
        return Verdict(Reason::DropMalformed);
    };
    let mut l3 = ETH_HDR_LEN;
    // Up to two VLAN tags (802.1ad outer + 802.1Q inner, or two 802.1Q): each pushes the real
    // EtherType four bytes further.
    if is_vlan(ether_type) {
        let Some(inner) = read_u16_be(ctx, ETH_HDR_LEN + 2) else {
            return Verdict(Reason::DropMalformed);
        };
        ether_type = inner;
        l3 = ETH_HDR_LEN + VLAN_HDR_LEN;
        if is_vlan(ether_type) {
            let Some(inner) = read_u16_be(ctx, ETH_HDR_LEN + VLAN_HDR_LEN + 2) else {
                return Verdict(Reason::DropMalformed);
            };
            ether_type = inner;
            l3 = ETH_HDR_LEN + 2 * VLAN_HDR_LEN;
        }
    }
    match ether_type {
        ETH_P_IPV4 => ipv4(ctx, l3, protected),
        ETH_P_IPV6 => ipv6(ctx, l3, protected),
        _ => Verdict(Reason::PassOther),
    }
}

#[inline(always)]
fn is_vlan(ether_type: u16) -> bool {
    ether_type == ETH_P_8021Q || ether_type == ETH_P_8021AD
}

#[inline(always)]
fn ipv4(ctx: &XdpContext, l3: usize, protected: impl Fn(u16) -> bool) -> Parsed {
    let Some(header) = bounded(ctx, l3, IPV4_MIN_HDR_LEN) else {
        return Verdict(Reason::DropMalformed);
    };
    // SAFETY (all reads below): `bounded` proved the 20 fixed header bytes lie in the frame.
    let version_ihl = unsafe { *header };
    let total_len = usize::from(unsafe { read_be16(header, 2) });
    let fragment = unsafe { read_be16(header, 6) };
    let protocol = unsafe { *header.add(9) };
    let source = unsafe { (header.add(12) as *const u32).read_unaligned() };

    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || header_len < IPV4_MIN_HDR_LEN || total_len < header_len {
        return Verdict(Reason::DropMalformed);
    }
    let frame_len = ctx.data_end() - ctx.data();
    if l3 + total_len > frame_len {
        return Verdict(Reason::DropMalformed);
    }
    if protocol != IPPROTO_TCP {
        return Verdict(Reason::PassOther);
    }
    if fragment & IPV4_OFFSET_MASK != 0 {
        // A later fragment: its TCP header (and so its port) is in the first one. TCP on the
        // wire does not fragment (DF + path MTU discovery), so these only feed reassembly.
        return Verdict(Reason::DropFragment);
    }
    let at = Headers {
        l3,
        l4: l3 + header_len,
        end: l3 + total_len,
        plain: header_len == IPV4_MIN_HDR_LEN,
    };
    tcp(ctx, at, Source::V4(source), fragment & IPV4_MF != 0, protected)
}

#[inline(always)]
fn ipv6(ctx: &XdpContext, l3: usize, protected: impl Fn(u16) -> bool) -> Parsed {
    let Some(header) = bounded(ctx, l3, IPV6_HDR_LEN) else {
        return Verdict(Reason::DropMalformed);
    };
    // SAFETY (all reads below): `bounded` proved the 40 header bytes lie in the frame.
    let version = unsafe { *header } >> 4;
    let payload_len = usize::from(unsafe { read_be16(header, 4) });
    let mut next = unsafe { *header.add(6) };
    // Two words, not 16 bytes: the hash and compares want words (two loads, the target allowing
    // misaligned access; see build.rs).
    let source = unsafe {
        [
            (header.add(8) as *const u64).read_unaligned(),
            (header.add(16) as *const u64).read_unaligned(),
        ]
    };

    if version != 6 {
        return Verdict(Reason::DropMalformed);
    }
    let end = l3 + IPV6_HDR_LEN + payload_len;
    if end > ctx.data_end() - ctx.data() {
        return Verdict(Reason::DropMalformed);
    }
    let mut offset = l3 + IPV6_HDR_LEN;
    let mut fragment = false;
    for _ in 0..MAX_EXT_HEADERS {
        match next {
            IPPROTO_TCP => break,
            IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS => {
                let Some(ext) = bounded(ctx, offset, 2) else {
                    return Verdict(Reason::DropMalformed);
                };
                // SAFETY: `bounded` proved both bytes lie in the frame.
                let (following, len_units) = unsafe { (*ext, *ext.add(1)) };
                next = following;
                offset += (usize::from(len_units) + 1) * 8;
            }
            IPV6_FRAGMENT => {
                let Some(ext) = bounded(ctx, offset, 8) else {
                    return Verdict(Reason::DropMalformed);
                };
                // SAFETY: `bounded` proved the 8 bytes lie in the frame.
                let (following, fragment_offset) = unsafe { (*ext, read_be16(ext, 2)) };
                if following == IPPROTO_TCP && fragment_offset & IPV6_FRAG_OFFSET_MASK != 0 {
                    // A later TCP fragment: see the IPv4 case.
                    return Verdict(Reason::DropFragment);
                }
                next = following;
                fragment = true;
                offset += 8;
            }
            _ => return Verdict(Reason::PassOther),
        }
        if offset > MAX_L4_OFFSET || offset > end {
            return Verdict(Reason::DropMalformed);
        }
    }
    if next != IPPROTO_TCP {
        // Still inside the extension-header chain: too long to classify, and such chains are
        // an evasion technique rather than something real clients send.
        return if matches!(next, IPV6_HOPOPTS | IPV6_ROUTING | IPV6_DSTOPTS | IPV6_FRAGMENT) {
            Verdict(Reason::DropMalformed)
        } else {
            Verdict(Reason::PassOther)
        };
    }
    let at = Headers {
        l3,
        l4: offset,
        end,
        plain: offset == l3 + IPV6_HDR_LEN,
    };
    tcp(ctx, at, Source::V6(source), fragment, protected)
}

/// Where the IP header starts, the TCP header starts and the IP payload ends (all from
/// `data`), and whether the IP header is the fixed one.
struct Headers {
    l3: usize,
    l4: usize,
    end: usize,
    plain: bool,
}

#[inline(always)]
fn tcp(
    ctx: &XdpContext,
    at: Headers,
    source: Source,
    fragment: bool,
    protected: impl Fn(u16) -> bool,
) -> Parsed {
    let Headers { l3, l4, end, plain } = at;
    if l4 > MAX_L4_OFFSET {
        return Verdict(Reason::DropMalformed);
    }
    let Some(header) = bounded(ctx, l4, TCP_MIN_HDR_LEN) else {
        return Verdict(Reason::DropMalformed);
    };
    // SAFETY (all reads below): `bounded` proved the 20 fixed header bytes lie in the frame.
    let destination_port = unsafe { read_be16(header, 2) };
    let data_offset = usize::from(unsafe { *header.add(12) } >> 4) * 4;
    let flags = unsafe { *header.add(13) };
    if l4 + TCP_MIN_HDR_LEN > end {
        // The IP payload is too short for a TCP header (the bytes above were padding).
        return Verdict(Reason::DropMalformed);
    }
    if !protected(destination_port) {
        return Verdict(Reason::PassOther);
    }
    if fragment {
        return Verdict(Reason::DropFragment);
    }
    if data_offset < TCP_MIN_HDR_LEN || l4 + data_offset > end {
        return Verdict(Reason::DropMalformed);
    }
    if invalid_flags(flags) {
        return Verdict(Reason::DropTcpFlags);
    }
    Parsed::Police {
        source,
        flags,
        segment: Segment {
            l3,
            plain,
            port: destination_port,
        },
    }
}

/// Flag combinations no TCP stack sends: scans and stack fingerprinting.
#[inline(always)]
fn invalid_flags(flags: u8) -> bool {
    // One shift and mask instead of four tests: bit `f` of the table is set when the six
    // classic flag bits `f` are invalid.
    INVALID_FLAGS >> (flags & 0x3f) & 1 != 0
}

const INVALID_FLAGS: u64 = {
    let syn_fin = TCP_SYN | TCP_FIN;
    let syn_rst = TCP_SYN | TCP_RST;
    let xmas = TCP_FIN | TCP_PSH | TCP_URG;
    let mut table = 0u64;
    let mut flags = 0u8;
    while flags < 64 {
        if flags & syn_fin == syn_fin || flags & syn_rst == syn_rst || flags == 0 || flags & xmas == xmas {
            table |= 1 << flags;
        }
        flags += 1;
    }
    table
};

/// The frame bytes `[offset, offset + len)`, if they all lie inside the frame.
#[inline(always)]
pub fn bounded(ctx: &XdpContext, offset: usize, len: usize) -> Option<*const u8> {
    bounded_mut(ctx, offset, len).map(|p| p as *const u8)
}

/// [`bounded`], for writing.
#[inline(always)]
pub fn bounded_mut(ctx: &XdpContext, offset: usize, len: usize) -> Option<*mut u8> {
    let start = ctx.data() + offset;
    if start + len > ctx.data_end() {
        return None;
    }
    Some(start as *mut u8)
}

#[inline(always)]
fn read_u16_be(ctx: &XdpContext, offset: usize) -> Option<u16> {
    // SAFETY: `bounded` proved both bytes lie inside the frame.
    bounded(ctx, offset, 2).map(|p| unsafe { read_be16(p, 0) })
}

/// # Safety
/// `base + offset .. base + offset + 2` must lie inside the frame.
#[inline(always)]
unsafe fn read_be16(base: *const u8, offset: usize) -> u16 {
    // SAFETY: the caller guarantees the bounds.
    u16::from_be(unsafe { (base.add(offset) as *const u16).read_unaligned() })
}
