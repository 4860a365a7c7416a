//! CLOCK_MONOTONIC in nanoseconds: the clock `bpf_ktime_get_coarse_ns()` reads in the kernel
//! (at tick resolution), so ban expiries written from userspace and read by the program agree.
use std::time::Duration;

use super::ShieldError;

/// Now on CLOCK_MONOTONIC, in nanoseconds since boot; the kernel's ban expiries use this clock.
pub fn monotonic_now_ns() -> Result<u64, ShieldError> {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: valid pointer to a timespec we own.
    if unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) } != 0 {
        return Err(ShieldError::Clock(std::io::Error::last_os_error()));
    }
    Ok(ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64)
}

/// Time from now until `until_ns` on the kernel's clock (`None` once it has passed).
pub fn until(until_ns: u64) -> Option<Duration> {
    let now = monotonic_now_ns().ok()?;
    until_ns.checked_sub(now).map(Duration::from_nanos)
}
