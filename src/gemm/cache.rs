//! The data caches of the core we run on, read once: size, line, ways and
//! sharing of L1d, L2 and L3, from Linux sysfs, from CPUID (leaf 4 on Intel,
//! 0x8000001D on AMD) where sysfs says nothing, or assumed where neither
//! does. The blocking arithmetic (`super::cache_model`) and the rules for
//! reading an operand in place take everything from here.

use std::sync::OnceLock;

/// One level of data (or unified) cache.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheLevel {
    /// Capacity in bytes, of the whole cache (not a share).
    pub size: usize,
    /// Line size in bytes.
    pub line: usize,
    /// Associativity (ways per set); a fully associative cache counts as
    /// one set of `size / line` ways.
    pub ways: usize,
    /// Logical CPUs that share this cache.
    pub shared_by: usize,
}

impl CacheLevel {
    /// A cache of `size` bytes, `line`-byte lines and `ways` ways, private
    /// to one CPU.
    pub const fn new(size: usize, line: usize, ways: usize) -> CacheLevel {
        CacheLevel {
            size,
            line,
            ways,
            shared_by: 1,
        }
    }

    /// The same cache shared by `cpus` logical CPUs.
    pub const fn shared(self, cpus: usize) -> CacheLevel {
        CacheLevel {
            shared_by: if cpus == 0 { 1 } else { cpus },
            ..self
        }
    }

    /// Sets: `size / (line · ways)`, at least 1.
    pub fn sets(&self) -> usize {
        (self.size / (self.line.max(1) * self.ways.max(1))).max(1)
    }

    /// Bytes of one way: what one set-index sweep covers.
    pub fn way_bytes(&self) -> usize {
        self.sets() * self.line.max(1)
    }

    /// One CPU's share of the capacity.
    pub fn per_core(&self) -> usize {
        self.size / self.shared_by.max(1)
    }

    /// Whether `rows` rows of an operand read in place, `row_bytes` apart,
    /// stay resident together with as much again of other data (the packed
    /// panels, C): rows whose starts are `2^t` lines apart (and line-aligned)
    /// map to only `sets / 2^t` of the sets, so they hold `ways · sets / 2^t`
    /// lines, whatever their width; the rows need `rows` lines in each of the
    /// sets they touch, and the factor 2 leaves half the ways to the rest.
    /// Rows at a stride that is not a whole number of lines drift across
    /// every set. A packed panel is contiguous and always spreads over every
    /// set. (1 MiB, 16 ways: 512 rows 4 KiB apart fail — 64 lines apart they
    /// fall in 16 of the 1024 sets — and reading them in place measured 22%
    /// slower than packing on Zen 5.)
    pub fn holds_rows(&self, row_bytes: usize, rows: usize) -> bool {
        rows <= self.rows_held(row_bytes)
    }

    /// Whether `rows` rows of a micro-panel, `row_bytes` apart, can stay
    /// resident together: rows a whole number of ways apart (a stride that
    /// is a multiple of [`CacheLevel::way_bytes`]) all fall into the same
    /// set, which holds `ways` of them; any other stride spreads them over
    /// at least two sets.
    pub fn holds_panel_rows(&self, row_bytes: usize, rows: usize) -> bool {
        !row_bytes.is_multiple_of(self.way_bytes().max(1)) || rows <= self.ways.max(1)
    }

    /// The most rows `row_bytes` apart that [`CacheLevel::holds_rows`]
    /// accepts.
    pub fn rows_held(&self, row_bytes: usize) -> usize {
        let line = self.line.max(1);
        let set_groups = if row_bytes.is_multiple_of(line) {
            let lines_apart = row_bytes / line;
            // Only the power-of-two part of the stride aliases the sets.
            (1usize << lines_apart.trailing_zeros().min(usize::BITS - 1)).min(self.sets())
        } else {
            1
        };
        self.per_core() / line / set_groups / 2
    }
}

/// Where a [`CacheHierarchy`] came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CacheSource {
    /// Linux sysfs (`/sys/devices/system/cpu/cpu0/cache`), with CPUID
    /// filling any geometry sysfs left out.
    Os,
    /// CPUID's deterministic cache parameters alone.
    Cpuid,
    /// Neither said anything: [`CacheHierarchy::ASSUMED`].
    Assumed,
}

/// The data caches one core sees.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CacheHierarchy {
    /// Level-1 data cache.
    pub l1d: CacheLevel,
    /// Level-2 cache.
    pub l2: CacheLevel,
    /// Level-3 cache, where there is one the core can see.
    pub l3: Option<CacheLevel>,
    /// Where the description came from.
    pub source: CacheSource,
}

impl CacheHierarchy {
    /// What we assume when nothing says otherwise: a conservative modern
    /// x86 or Arm core (32 KiB 8-way L1d, 512 KiB 8-way L2, 2 MiB of a
    /// 16-way L3), 64-byte lines.
    pub const ASSUMED: CacheHierarchy = CacheHierarchy {
        l1d: CacheLevel::new(32 * 1024, 64, 8),
        l2: CacheLevel::new(512 * 1024, 64, 8),
        l3: Some(CacheLevel::new(2 * 1024 * 1024, 64, 16)),
        source: CacheSource::Assumed,
    };

    /// One core's share of the last level beyond L2 (0 without an L3).
    pub fn l3_per_core(&self) -> usize {
        self.l3.map_or(0, |l3| l3.per_core())
    }
}

/// The caches of the CPU this process started on, detected once.
pub fn cache_hierarchy() -> &'static CacheHierarchy {
    static CACHES: OnceLock<CacheHierarchy> = OnceLock::new();
    CACHES.get_or_init(detect)
}

fn detect() -> CacheHierarchy {
    let cpuid = cpuid_levels();
    match sysfs_levels() {
        Some(os) => merge(os, cpuid, CacheSource::Os),
        None => match cpuid {
            Some(levels) => merge(levels, None, CacheSource::Cpuid),
            None => CacheHierarchy::ASSUMED,
        },
    }
}

/// What one source says about levels 1–3 of data/unified cache: any field
/// it left out is 0.
type RawLevels = [CacheLevel; 3];

const UNKNOWN: CacheLevel = CacheLevel {
    size: 0,
    line: 0,
    ways: 0,
    shared_by: 0,
};

/// Completes `primary` from `secondary`, then from the assumptions, level
/// by level and field by field; an L3 neither source reports stays absent.
fn merge(primary: RawLevels, secondary: Option<RawLevels>, source: CacheSource) -> CacheHierarchy {
    let assumed = CacheHierarchy::ASSUMED;
    let fallback = [assumed.l1d, assumed.l2, assumed.l3.unwrap_or(assumed.l2)];
    let level = |i: usize| {
        let p = primary[i];
        let s = secondary.map_or(UNKNOWN, |s| s[i]);
        let pick = |a: usize, b: usize, c: usize| {
            if a > 0 {
                a
            } else if b > 0 {
                b
            } else {
                c
            }
        };
        let size = pick(p.size, s.size, fallback[i].size);
        let line = pick(p.line, s.line, fallback[i].line);
        // Ways from the other source only where it describes a cache of the
        // same size; otherwise derive them from a reported set count, or
        // assume.
        let ways = if p.ways > 0 {
            p.ways
        } else if s.ways > 0 && s.size == size {
            s.ways
        } else {
            fallback[i].ways
        };
        let shared_by = pick(p.shared_by, s.shared_by, 1);
        (p.size > 0 || s.size > 0).then_some(CacheLevel {
            size,
            line,
            ways,
            shared_by,
        })
    };
    CacheHierarchy {
        l1d: level(0).unwrap_or(fallback[0]),
        l2: level(1).unwrap_or(fallback[1]),
        l3: level(2),
        source,
    }
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
fn sysfs_levels() -> Option<RawLevels> {
    let mut levels = [UNKNOWN; 3];
    let mut found = false;
    for index in 0..8 {
        let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{index}");
        let read = |f: &str| std::fs::read_to_string(format!("{dir}/{f}")).ok();
        let number = |f: &str| read(f).and_then(|s| s.trim().parse::<usize>().ok());
        let (Some(level), Some(kind), Some(size)) = (number("level"), read("type"), read("size"))
        else {
            continue;
        };
        if kind.trim() == "Instruction" || !(1..=3).contains(&level) {
            continue;
        }
        let Some(bytes) = parse_size(&size) else {
            continue;
        };
        let line = number("coherency_line_size").unwrap_or(0);
        // Some kernels report 0 ways for a fully associative cache, and
        // some hypervisors leave the file out: derive from sets if present.
        let ways = number("ways_of_associativity")
            .filter(|&w| w > 0)
            .or_else(|| {
                let sets = number("number_of_sets")?;
                (sets > 0 && line > 0).then(|| bytes / (sets * line))
            })
            .unwrap_or(0);
        let shared_by = read("shared_cpu_list")
            .and_then(|s| count_cpu_list(&s))
            .unwrap_or(0);
        levels[level - 1] = CacheLevel {
            size: bytes,
            line,
            ways,
            shared_by,
        };
        found = true;
    }
    found.then_some(levels)
}

#[cfg(not(target_os = "linux"))]
fn sysfs_levels() -> Option<RawLevels> {
    None
}

/// Decodes one subleaf of CPUID's deterministic cache parameters (leaf 4
/// on Intel, 0x8000001D on AMD: the same layout). `None` past the last
/// cache; instruction caches and levels above 3 decode as `Some(None)`.
fn decode_cpuid_cache(eax: u32, ebx: u32, ecx: u32) -> Option<Option<(usize, CacheLevel)>> {
    let kind = eax & 0x1f;
    if kind == 0 {
        return None;
    }
    let level = ((eax >> 5) & 0x7) as usize;
    if kind == 2 || !(1..=3).contains(&level) {
        return Some(None);
    }
    let line = (ebx & 0xfff) as usize + 1;
    let partitions = ((ebx >> 12) & 0x3ff) as usize + 1;
    let ways = (ebx >> 22) as usize + 1;
    let sets = ecx as usize + 1;
    let shared_by = ((eax >> 14) & 0xfff) as usize + 1;
    Some(Some((
        level,
        CacheLevel {
            size: ways * partitions * line * sets,
            line,
            ways,
            shared_by,
        },
    )))
}

#[cfg(target_arch = "x86_64")]
fn cpuid_levels() -> Option<RawLevels> {
    use core::arch::x86_64::{__cpuid, __cpuid_count, CpuidResult};
    // `__cpuid` became a safe function in later toolchains than our
    // minimum; the block keeps both compiling.
    #[allow(unused_unsafe)]
    // SAFETY: CPUID exists on every x86-64 CPU and only reads identification
    // registers.
    let query = |leaf: u32, sub: u32| -> CpuidResult { unsafe { __cpuid_count(leaf, sub) } };
    #[allow(unused_unsafe)]
    // SAFETY: as above.
    let vendor_leaf = unsafe { __cpuid(0) };
    let amd = crate::arch::vendor() == crate::arch::Vendor::Amd;
    let leaf = if amd {
        #[allow(unused_unsafe)]
        // SAFETY: as above.
        let max_ext = unsafe { __cpuid(0x8000_0000) }.eax;
        if max_ext < 0x8000_001d {
            return None;
        }
        0x8000_001d
    } else {
        if vendor_leaf.eax < 4 {
            return None;
        }
        4
    };
    let mut levels = [UNKNOWN; 3];
    let mut found = false;
    for sub in 0..16 {
        let r = query(leaf, sub);
        match decode_cpuid_cache(r.eax, r.ebx, r.ecx) {
            None => break,
            Some(None) => {}
            Some(Some((level, cache))) => {
                levels[level - 1] = cache;
                found = true;
            }
        }
    }
    found.then_some(levels)
}

#[cfg(not(target_arch = "x86_64"))]
fn cpuid_levels() -> Option<RawLevels> {
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

    /// Leaf 0x8000001D as a Zen 5 reports it: L1d 48 KiB 12-way, L2 1 MiB
    /// 16-way, L3 32 MiB 16-way shared by 16 threads; subleaf 1 is the L1i.
    #[test]
    fn decodes_cpuid_cache_leaves() {
        let l1d = decode_cpuid_cache(0x121, 0x02c0_003f, 0x3f);
        assert_eq!(l1d, Some(Some((1, CacheLevel::new(48 * 1024, 64, 12)))));
        let l1i = decode_cpuid_cache(0x122, 0x01c0_003f, 0x3f);
        assert_eq!(l1i, Some(None));
        let l2 = decode_cpuid_cache(0x143, 0x03c0_003f, 0x3ff);
        assert_eq!(l2, Some(Some((2, CacheLevel::new(1 << 20, 64, 16)))));
        let l3 = decode_cpuid_cache(0x3c163, 0x03c0_003f, 0x7fff);
        assert_eq!(
            l3,
            Some(Some((3, CacheLevel::new(32 << 20, 64, 16).shared(16))))
        );
        assert_eq!(decode_cpuid_cache(0, 0, 0), None);
    }

    #[test]
    fn merge_fills_what_one_source_left_out() {
        let mut os = [UNKNOWN; 3];
        os[0] = CacheLevel {
            ways: 0,
            ..CacheLevel::new(48 * 1024, 64, 12)
        };
        os[1] = CacheLevel::new(1 << 20, 64, 16);
        let mut cpuid = [UNKNOWN; 3];
        cpuid[0] = CacheLevel::new(48 * 1024, 64, 12);
        // A hypervisor may report a different L2 through CPUID: its ways
        // do not describe the cache sysfs names.
        cpuid[1] = CacheLevel::new(2 << 20, 64, 8);
        let h = merge(os, Some(cpuid), CacheSource::Os);
        assert_eq!(h.l1d, CacheLevel::new(48 * 1024, 64, 12));
        assert_eq!(h.l2, CacheLevel::new(1 << 20, 64, 16));
        assert_eq!(h.l3, None);
        // Nothing at all: the assumptions.
        let empty = merge([UNKNOWN; 3], None, CacheSource::Os);
        assert_eq!(empty.l1d, CacheHierarchy::ASSUMED.l1d);
    }

    #[test]
    fn in_place_rows_must_spread_over_the_sets() {
        let l2 = CacheLevel::new(1 << 20, 64, 16);
        // B panels of 512 rows 4 KiB or 8 KiB apart: 16 or 8 set groups.
        assert!(!l2.holds_rows(4096, 512));
        assert!(!l2.holds_rows(8192, 512));
        // 64×147×12544 and 64×576×3136: 16 and 4 lines' power of two.
        assert!(l2.holds_rows(12544 * 4, 152));
        assert!(l2.holds_rows(3136 * 4, 288));
        // Rows that are not a whole number of lines apart drift across the sets.
        assert!(l2.holds_rows(4000, 512));
        // An A block of 256 whole rows of 512 floats.
        assert!(l2.holds_rows(2048, 256));
        // A smaller cache holds fewer rows at the same stride.
        let small = CacheLevel::new(256 * 1024, 64, 4);
        assert!(!small.holds_rows(12544 * 4, 152));
        // Rows a whole way apart all fall into one set: its ways hold them.
        assert!(l2.holds_rows(65536, 8));
        assert!(!l2.holds_rows(65536, 9));
    }

    /// A micro-panel's rows read in place fit L1 unless a whole number of
    /// its ways apart, on the L1s of Zen 4 and Skylake-SP (32 KiB, 8 ways),
    /// Zen 5 and Sapphire Rapids (48 KiB, 12 ways) and Apple M-class
    /// performance cores (128 KiB, 8 ways: 16 KiB ways).
    #[test]
    fn panel_rows_a_whole_way_apart_share_one_set() {
        let zen4 = CacheLevel::new(32 * 1024, 64, 8);
        let zen5 = CacheLevel::new(48 * 1024, 64, 12);
        let apple = CacheLevel::new(128 * 1024, 64, 8);
        for l1 in [zen4, zen5] {
            // 2048, 3072 and 5120 floats: 2, 3 and 5 ways of 4 KiB.
            for floats in [2048, 3072, 5120] {
                assert!(!l1.holds_panel_rows(floats * 4, 64), "{l1:?} {floats}");
                assert!(l1.holds_panel_rows(floats * 4, l1.ways), "{l1:?} {floats}");
            }
            // Half a way off (3584 floats), a 56² plane (3136), 12544.
            for floats in [3584, 3136, 12544] {
                assert!(l1.holds_panel_rows(floats * 4, 512), "{l1:?} {floats}");
            }
        }
        // 12 KiB is not a whole number of Apple's 16 KiB ways; 16 KiB is.
        assert!(apple.holds_panel_rows(3072 * 4, 64));
        assert!(!apple.holds_panel_rows(4096 * 4, 64));
        assert!(apple.holds_panel_rows(4096 * 4, 8));
    }

    #[test]
    fn the_detected_caches_are_sane() {
        let c = cache_hierarchy();
        for level in [c.l1d, c.l2].into_iter().chain(c.l3) {
            assert!(level.size >= 4096 && level.line >= 16 && level.ways >= 1);
            assert!(level.sets() * level.ways * level.line <= level.size);
        }
        assert!(c.l2.size >= c.l1d.size);
    }
}
