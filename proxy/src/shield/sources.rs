//! The kernel's source tables (`SOURCES_V4` / `SOURCES_V6`) seen from userspace: where the
//! program keeps each source's token buckets and the bans it decided (see
//! [`proxy_common::SourceState`]).
//!
//! The tables are BPF arrays of 262,144 slots. Reading them one syscall per slot would take a
//! good part of a second, so they are created mmapable and [`SourceTable`] maps them into our
//! memory: listing the kernel's bans is a scan of a few megabytes, and lifting one is a single
//! store into the slot. Userspace never needs the program's hash: it scans for the address.
use std::ptr::NonNull;
use std::sync::atomic::{AtomicU64, Ordering};

use aya::maps::{Map, MapData};
use proxy_common::{BPF_F_MMAPABLE, SourceState};

use super::ShieldError;

/// One mapped source table; `A` is the address as the table stores it.
pub struct SourceTable<A> {
    slots: NonNull<SourceState<A>>,
    len: usize,
    mapped_bytes: usize,
    /// Keeps the map's fd open while it is mapped.
    _map: MapData,
}

// SAFETY: the mapping is plain shared memory owned by this value; every access goes through
// volatile reads or atomic stores, since the kernel writes it concurrently anyway.
unsafe impl<A: Send> Send for SourceTable<A> {}

impl<A: Copy + PartialEq> SourceTable<A> {
    /// Maps the table `map` into memory (read and write).
    pub fn new(map: Map, name: &'static str) -> Result<Self, ShieldError> {
        let fail = |source| ShieldError::SourceTable { name, source };
        let Map::Array(data) = map else {
            return Err(fail(std::io::Error::other("not an array map")));
        };
        let info = data.info()?;
        let slot_size = size_of::<SourceState<A>>();
        if info.value_size() as usize != slot_size || info.map_flags() & BPF_F_MMAPABLE == 0 {
            return Err(fail(std::io::Error::other(format!(
                "expected an mmapable array of {slot_size}-byte slots"
            ))));
        }
        let len = info.max_entries() as usize;
        // SAFETY: sysconf has no preconditions.
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as usize;
        let mapped_bytes = (len * slot_size).div_ceil(page) * page;
        let fd = std::os::fd::AsRawFd::as_raw_fd(&std::os::fd::AsFd::as_fd(data.fd()));
        // SAFETY: a fresh shared mapping of the map's fd; the kernel checks the length against
        // the array and the fd stays open (in `_map`) until we unmap.
        let address = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped_bytes,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            )
        };
        if address == libc::MAP_FAILED {
            return Err(fail(std::io::Error::last_os_error()));
        }
        Ok(Self {
            slots: NonNull::new(address.cast()).expect("mmap returned a null mapping"),
            len,
            mapped_bytes,
            _map: data,
        })
    }

    /// Slots whose kernel ban lasts beyond `now`: index, address, end of the ban. Only the ban
    /// field is read from every slot (most have none); a slot may be torn if the kernel is
    /// writing it right now.
    fn banned(&self, now: u64) -> impl Iterator<Item = (usize, A, u64)> + '_ {
        (0..self.len).filter_map(move |index| {
            // SAFETY: `index < self.len` and the mapping holds `len` slots: the offset stays in it.
            let slot = unsafe { self.slots.as_ptr().add(index) };
            // SAFETY: `slot` is in bounds and 8-byte aligned (the mapping is page aligned and slots
            // are multiples of 8 bytes), and any bits are a valid u64. Volatile, since the kernel
            // writes the slot concurrently.
            let until = unsafe { (&raw const (*slot).banned_until_ns).read_volatile() };
            if until <= now {
                return None;
            }
            // SAFETY: in bounds and aligned as above; every bit pattern is a valid SourceState
            // (integers only).
            let copy = unsafe { slot.read_volatile() };
            (copy.generation != 0).then_some((index, copy.addr, until))
        })
    }

    /// Every source whose kernel ban lasts beyond `now`, with the ban's end.
    pub fn bans(&self, now: u64) -> Vec<(A, u64)> {
        self.banned(now).map(|(_, addr, until)| (addr, until)).collect()
    }

    /// When the kernel's ban on `addr` ends, if it lasts beyond `now`.
    pub fn banned_until(&self, addr: A, now: u64) -> Option<u64> {
        self.banned(now)
            .filter(|(_, banned, _)| *banned == addr)
            .map(|(_, _, until)| until)
            .max()
    }

    /// Lifts the kernel's ban on `addr`; returns whether one was in force.
    pub fn lift_ban(&self, addr: A, now: u64) -> bool {
        let slots: Vec<usize> = self
            .banned(now)
            .filter(|(_, banned, _)| *banned == addr)
            .map(|(index, _, _)| index)
            .collect();
        for &index in &slots {
            // SAFETY: in bounds; the field is 8-byte aligned (the mapping is page aligned and
            // slots are multiples of 8 bytes), so it can be stored atomically.
            let field = unsafe { &raw mut (*self.slots.as_ptr().add(index)).banned_until_ns };
            // SAFETY: `field` is valid and aligned for as long as the mapping lives, which outlives
            // this borrow; nothing else in this process can access it meanwhile (`SourceTable` is
            // not `Sync`), and the kernel's own writes are outside Rust's memory model.
            unsafe { AtomicU64::from_ptr(field) }.store(0, Ordering::Relaxed);
        }
        !slots.is_empty()
    }
}

impl<A> Drop for SourceTable<A> {
    fn drop(&mut self) {
        // SAFETY: exactly the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.slots.as_ptr().cast(), self.mapped_bytes) };
    }
}
