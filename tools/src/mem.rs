//! Whether a run's buffers can be had at all, checked before any timing, so
//! an enormous shape fails in a moment with a message instead of after the
//! peak measurement, or by the out-of-memory killer halfway through.

use crate::suite::try_alloc;

/// Bytes of memory this process may use: RAM plus swap, or less where a
/// cgroup caps it; `None` where neither is known (not Linux).
fn memory_limit() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok()?;
    let kib = |key: &str| {
        meminfo
            .lines()
            .find_map(|l| l.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
    };
    let total = kib("MemTotal")?.saturating_add(kib("SwapTotal").unwrap_or(0));
    let total = total.saturating_mul(1024);
    // cgroup v2 says "max" when unlimited, which does not parse.
    let cgroup = std::fs::read_to_string("/sys/fs/cgroup/memory.max")
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok());
    Some(cgroup.map_or(total, |c| c.min(total)))
}

/// Fails unless every buffer `(what, f32 count)` can be reserved at once and
/// all of them fit in memory together. The reservations are dropped untouched,
/// so the check costs no memory: with overcommit, a reservation the kernel
/// grants can still be more than the machine holds, hence the total.
pub fn check_room(buffers: &[(&str, usize)]) -> Result<(), String> {
    let mut held = Vec::with_capacity(buffers.len());
    let mut total: u128 = 0;
    for &(what, len) in buffers {
        held.push(try_alloc(what, len)?);
        total += len as u128 * std::mem::size_of::<f32>() as u128;
    }
    drop(held);
    match memory_limit() {
        Some(limit) if total > u128::from(limit) => {
            let parts: Vec<String> = buffers
                .iter()
                .map(|&(what, len)| format!("{what} {}", len as u128 * 4))
                .collect();
            Err(format!(
                "needs {total} bytes ({}), more than the {limit} bytes of memory \
                 and swap this process may use",
                parts.join(", ")
            ))
        }
        _ => Ok(()),
    }
}
