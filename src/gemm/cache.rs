//! Data-cache sizes, read once from the OS (Linux sysfs), for the blocking
//! arithmetic; defaults where the OS says nothing.

use std::sync::OnceLock;

/// Per-core view of the data caches, in bytes.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheSizes {
    /// L1 data cache of one core.
    pub l1d: usize,
    /// L2 of one core (or its share).
    pub l2: usize,
    /// L3 share of one core: the cache size divided by the CPUs that share it.
    pub l3_per_core: usize,
    /// Whether the sizes came from the OS (`false`: the defaults below).
    pub from_os: bool,
}

/// What we assume when the OS says nothing: a conservative modern x86 or
/// Arm core (32 KiB L1d, 512 KiB L2, 2 MiB of L3 per core).
const DEFAULT: CacheSizes = CacheSizes {
    l1d: 32 * 1024,
    l2: 512 * 1024,
    l3_per_core: 2 * 1024 * 1024,
    from_os: false,
};

/// The cache sizes of CPU 0, detected once.
pub fn cache_sizes() -> CacheSizes {
    static SIZES: OnceLock<CacheSizes> = OnceLock::new();
    *SIZES.get_or_init(|| read_sysfs().unwrap_or(DEFAULT))
}

/// Parses `"48K"`, `"1024K"`, `"32M"` or a plain byte count.
fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let (digits, mult) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 1024),
        b'M' | b'm' => (&s[..s.len() - 1], 1024 * 1024),
        b'G' | b'g' => (&s[..s.len() - 1], 1024 * 1024 * 1024),
        _ => (s, 1),
    };
    digits.parse::<usize>().ok()?.checked_mul(mult)
}

/// Number of CPUs in a sysfs list such as `"0-3,8-11"`.
fn count_cpu_list(s: &str) -> Option<usize> {
    let mut n = 0usize;
    for part in s.trim().split(',').filter(|p| !p.is_empty()) {
        n += match part.split_once('-') {
            Some((a, b)) => {
                b.parse::<usize>()
                    .ok()?
                    .checked_sub(a.parse::<usize>().ok()?)?
                    + 1
            }
            None => {
                part.parse::<usize>().ok()?;
                1
            }
        };
    }
    (n > 0).then_some(n)
}

#[cfg(target_os = "linux")]
fn read_sysfs() -> Option<CacheSizes> {
    let mut sizes = DEFAULT;
    let mut found = false;
    for index in 0..8 {
        let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{index}");
        let read = |f: &str| std::fs::read_to_string(format!("{dir}/{f}")).ok();
        let (Some(level), Some(kind), Some(size)) = (read("level"), read("type"), read("size"))
        else {
            continue;
        };
        if kind.trim() == "Instruction" {
            continue;
        }
        let Some(bytes) = parse_size(&size) else {
            continue;
        };
        let sharing = read("shared_cpu_list")
            .and_then(|s| count_cpu_list(&s))
            .unwrap_or(1);
        match level.trim() {
            "1" => sizes.l1d = bytes,
            "2" => sizes.l2 = bytes / sharing,
            "3" => sizes.l3_per_core = bytes / sharing,
            _ => continue,
        }
        found = true;
    }
    found.then_some(CacheSizes {
        from_os: true,
        ..sizes
    })
}

#[cfg(not(target_os = "linux"))]
fn read_sysfs() -> Option<CacheSizes> {
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_sysfs_formats() {
        assert_eq!(parse_size("48K\n"), Some(48 * 1024));
        assert_eq!(parse_size("32M"), Some(32 << 20));
        assert_eq!(parse_size("4096"), Some(4096));
        assert_eq!(parse_size("x"), None);
        assert_eq!(count_cpu_list("0-1\n"), Some(2));
        assert_eq!(count_cpu_list("0-3,8-11"), Some(8));
        assert_eq!(count_cpu_list("5"), Some(1));
    }

    #[test]
    fn sizes_are_sane() {
        let c = cache_sizes();
        assert!(c.l1d >= 4096 && c.l2 >= c.l1d);
    }
}
