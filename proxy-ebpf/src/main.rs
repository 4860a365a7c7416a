//! Sluice's XDP shield: runs on every received frame before the kernel allocates an skb.
//!
//! It owns the fast drop decisions. Today: parse Ethernet + IPv4, drop frames whose headers are
//! malformed, drop sources that the relay banned (with expiry), and count every verdict per CPU
//! (packets and bytes). Anything it does not understand is passed untouched.
#![no_std]
#![no_main]

use aya_ebpf::{
    bindings::xdp_action,
    helpers::bpf_ktime_get_ns,
    macros::{map, xdp},
    maps::{HashMap, PerCpuArray},
    programs::XdpContext,
};
use proxy_common::{BanEntry, Counter, Reason};

#[map(name = "BANNED_V4")]
static BANNED_V4: HashMap<u32, BanEntry> = HashMap::with_max_entries(65_536, 0);

#[map(name = "COUNTERS")]
static COUNTERS: PerCpuArray<Counter> = PerCpuArray::with_max_entries(Reason::COUNT, 0);

const ETH_HDR_LEN: usize = 14;
const ETH_P_IPV4: u16 = 0x0800;
const IPV4_MIN_HDR_LEN: usize = 20;

#[xdp]
pub fn sluice_shield(ctx: XdpContext) -> u32 {
    let reason = classify(&ctx);
    count(reason, ctx.data_end() - ctx.data());
    if reason.is_drop() {
        xdp_action::XDP_DROP
    } else {
        xdp_action::XDP_PASS
    }
}

fn classify(ctx: &XdpContext) -> Reason {
    let Some(ether_type) = read_u16_be(ctx, 12) else {
        return Reason::DropMalformed;
    };
    if ether_type != ETH_P_IPV4 {
        return Reason::PassOther;
    }
    let Some(version_ihl) = read_u8(ctx, ETH_HDR_LEN) else {
        return Reason::DropMalformed;
    };
    let header_len = usize::from(version_ihl & 0x0f) * 4;
    if version_ihl >> 4 != 4 || header_len < IPV4_MIN_HDR_LEN {
        return Reason::DropMalformed;
    }
    // Read fixed-offset fields before the variable-length check: the verifier tracks constant
    // offsets only, and LLVM would otherwise drop this bound check as implied by the one below.
    let Some(source) = read_u32_ne(ctx, ETH_HDR_LEN + 12) else {
        return Reason::DropMalformed;
    };
    if ctx.data() + ETH_HDR_LEN + header_len > ctx.data_end() {
        return Reason::DropMalformed;
    }
    // SAFETY: the value is copied out at once; the map is only written whole by userspace.
    if let Some(ban) = unsafe { BANNED_V4.get(source) } {
        // SAFETY: helper without preconditions.
        if ban.until_ns > unsafe { bpf_ktime_get_ns() } {
            return Reason::DropBanned;
        }
    }
    Reason::Pass
}

fn count(reason: Reason, bytes: usize) {
    if let Some(counter) = COUNTERS.get_ptr_mut(reason as u32) {
        // SAFETY: per-CPU slot, only this CPU writes it while the program runs.
        unsafe {
            (*counter).packets += 1;
            (*counter).bytes += bytes as u64;
        }
    }
}

#[inline(always)]
fn bounded(ctx: &XdpContext, offset: usize, len: usize) -> Option<*const u8> {
    let start = ctx.data() + offset;
    if start + len > ctx.data_end() {
        return None;
    }
    Some(start as *const u8)
}

#[inline(always)]
fn read_u8(ctx: &XdpContext, offset: usize) -> Option<u8> {
    // SAFETY: `bounded` proved the byte lies inside the frame.
    bounded(ctx, offset, 1).map(|p| unsafe { *p })
}

#[inline(always)]
fn read_u16_be(ctx: &XdpContext, offset: usize) -> Option<u16> {
    // SAFETY: `bounded` proved both bytes lie inside the frame.
    bounded(ctx, offset, 2).map(|p| u16::from_be(unsafe { (p as *const u16).read_unaligned() }))
}

/// Reads four bytes as they are on the wire (network order), for use as a map key.
#[inline(always)]
fn read_u32_ne(ctx: &XdpContext, offset: usize) -> Option<u32> {
    // SAFETY: `bounded` proved the four bytes lie inside the frame.
    bounded(ctx, offset, 4).map(|p| unsafe { (p as *const u32).read_unaligned() })
}

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}
