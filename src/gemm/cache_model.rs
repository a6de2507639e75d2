//! Cache blocking from the cache hierarchy, by the analytical model of Low,
//! Igual, Smith and Quintana-Ortí, "Analytical Modeling Is Enough for
//! High-Performance BLIS" (ACM TOMS 43(2), 2016), for our loop order: the
//! driver packs a KC × NC block of B (reused by every MC block of A), packs
//! an MC × KC block of A, and the macro-kernel runs the NR loop outside the
//! MR loop, so one `kc × nr` micro-panel of B is reused by all `mc / mr`
//! micro-panels of A that stream past it.
//!
//! The model places each operand in the cache level that serves its reuse,
//! counting **ways**, not bytes: an operand of `b` bytes laid out
//! contiguously occupies `⌈b / way_bytes⌉` ways of every set, and LRU keeps
//! it resident as long as the other operands streaming through the same sets
//! leave those ways alone.
//!
//! * **Where the B micro-panel lives.** Low et al. keep it in L1 while A's
//!   micro-panels stream: with the ways split in proportion to the two
//!   panels, A gets `C_A = ⌊(W₁ − 1) / (1 + nr/mr)⌋` ways and
//!   `kc₁ = C_A · N₁ · L₁ / (mr · S)`, B holds `C_B = ⌈kc₁·nr·S / (N₁·L₁)⌉`,
//!   one way is left for the C tile. (For a tile so wide that `C_A` would be
//!   0, A gets one way and KC is what B's `W₁ − 2` ways hold.) That depth is
//!   short (256 on a 48 KiB 12-way L1 for the 8×32 tile, 128 on a 32 KiB
//!   8-way one), and every KC block costs a C-tile update (load, add, store;
//!   the column kernel also transposes). Where L2 can feed both panels to
//!   the FMAs, we keep the B micro-panel in **one way of L2** instead:
//!   `kc₂ = N₂ · L₂ / (nr · S)`, and L1 only buffers. A k-step reads
//!   `(mr + nr)·S` bytes for `mr·nr / lanes` FMAs (two per cycle), so it
//!   needs `2·(mr + nr)·S·lanes / (mr·nr)` bytes per cycle from L2: 20 for
//!   the AVX-512 8×32 tile, 15 for AVX2 6×16, against the 64 bytes per cycle
//!   of L2 → L1 on every x86 core since Haswell and Zen 1 (and Apple's); we
//!   require at most half of [`L2_BYTES_PER_CYCLE`]. Measured on Zen 5
//!   (1 thread AVX-512, one process, interleaved; GFLOP/s): KC 256 / MC 896
//!   (L1 regime) against 512 / 448 (L2 regime): 1024³ 228 / 234, 2048³
//!   222 / 232, 512³ 222 / 235, 64×576×3136 180 / 185, 1×1 512 → 2048 on
//!   7×7 (column kernel) 194 / 207; 128×1152×784 220 / 214, 64×147×12544
//!   172 / 164 within the noise.
//! * **MC (L2).** The packed A block (`mc·kc`) stays in L2 while the B
//!   micro-panel passes through it (`C_B₂ = ⌈kc·nr·S / (N₂·L₂)⌉` ways), with
//!   one way left over: `mc = (W₂ − 1 − C_B₂) · N₂ · L₂ / (kc · S)`.
//! * **Tall A (L3).** Where the B micro-panel lives in L2, each A micro-panel
//!   also streams from L2, beside it: two L2 streams feed the kernel. When
//!   C has more rows than MC the driver turns the inner loops around
//!   instead (the order of BLIS, whose vector operand is our B): blocks of
//!   `tall_mc` rows of A stay in L3, each A micro-panel stays in L1 while
//!   every panel of a B block of half of L2 (`single_block_columns`) streams
//!   past it from L2, and B is packed once per block of `tall_mc` rows:
//!   `tall_mc = (W₃ − 1 − C_B₃') · way₃ / (kc · S)`, `C_B₃'` the L3 ways of
//!   that B block. 0 (the classic nest) in the L1 regime, without an L3, or
//!   where that is not taller than MC. Measured, 1 thread AVX-512, Intel
//!   Xeon (family 6 model 167), one process alternating with the classic
//!   nest, median of 7 rounds: 1024³ 153.8 → 163.8, 1536³ 153.9 → 165.6,
//!   2048³ 151.9 → 165.0, 960³ 158.3 → 164.2 GFLOP/s.
//! * **NC (L3).** The packed B block (`kc·nc`) stays in this core's share of
//!   L3 while the A block passes through:
//!   `nc = (W₃ − 1 − C_A₃) · way₃ / (kc · S)`, with `way₃` one way's share of
//!   the core and `C_A₃` the ways the A block needs of it. The B block is also
//!   every thread's largest buffer, so it is capped at
//!   [`MAX_B_BLOCK_BYTES`]; without an L3 the cap alone decides.
//!
//! The result is rounded to what the kernels need (KC to a multiple of 8, MC
//! to whole `mr` tiles, NC to whole `nr` panels) and clamped to sane bounds
//! (`KC_RANGE`, `MC_MAX`). The derivation is in the fields of
//! [`ModelBlocking`], which `cpuconv info` prints.

use super::cache::{CacheHierarchy, CacheLevel};

/// The GEMM's bound on one task's packed B block, whatever the caches say.
/// B's buffer is the largest of the packing buffers, which every thread
/// keeps for its whole life and which a caller's workspace must hold, so the
/// GEMM keeps them bounded by the blocking and small. Wider blocks would
/// only save packing A again for each block of NC columns: at NC = 1024 that
/// is one packed element of A per 1024 multiply-adds.
pub const MAX_B_BLOCK_BYTES: usize = 2 * 1024 * 1024;

/// KC outside this range is clamped: below 64 the C tile's load and store
/// (`2·mr·nr` elements per `mr·nr·kc` multiply-adds) stop being negligible;
/// above 512 the gain is gone while the A micro-panel outgrows L1 (Zen 5,
/// 8×32: KC 768 against 512 measured 2048³ 187 against 211 GFLOP/s, other
/// shapes equal).
pub const KC_RANGE: (usize, usize) = (64, 512);

/// Bytes per cycle L2 delivers to L1 on the cores we know (64 on x86 since
/// Haswell and Zen 1, and on Apple's): the B micro-panel stays in L2 where
/// the kernel needs at most half of it.
pub const L2_BYTES_PER_CYCLE: usize = 64;

/// MC above this is clamped: taller blocks only delay the first B reuse.
pub const MC_MAX: usize = 2048;

/// The model's derivation for one `mr × nr` kernel and one element size.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ModelBlocking {
    /// Rows of the register tile.
    pub mr: usize,
    /// Columns of the register tile.
    pub nr: usize,
    /// Bytes per element.
    pub element_bytes: usize,
    /// L1 ways the L1 regime gives the streaming A micro-panels (`C_A`).
    pub l1_a_ways: usize,
    /// L1 ways the L1 regime's B micro-panel takes (`C_B`).
    pub l1_b_ways: usize,
    /// Depth the L1 regime allows (`kc₁`, before rounding and clamping).
    pub kc_l1: usize,
    /// Bytes per cycle the kernel reads from L2 when both panels stream
    /// from there.
    pub l2_feed_bytes_per_cycle: usize,
    /// The level that holds the B micro-panel: 1 or 2.
    pub b_panel_level: u8,
    /// L2 ways the B micro-panel takes on its way to L1 (`C_B₂`).
    pub l2_b_ways: usize,
    /// L2 ways given to the resident A block (`W₂ − 1 − C_B₂`).
    pub l2_a_ways: usize,
    /// L3 ways (of this core's share) the A block takes (`C_A₃`); 0 without
    /// an L3.
    pub l3_a_ways: usize,
    /// L3 ways (of this core's share) given to the B block; 0 without an L3.
    pub l3_b_ways: usize,
    /// Depth of a block.
    pub kc: usize,
    /// Rows of A per block.
    pub mc: usize,
    /// Columns of B per block.
    pub nc: usize,
    /// L3 ways (of this core's share) that the half-L2 B block of the
    /// tall-A order takes; 0 without it.
    pub l3_tall_b_ways: usize,
    /// Rows of A per L3 block in the tall-A order (see the module doc); 0
    /// where the classic nest runs at every height.
    pub tall_mc: usize,
}

impl ModelBlocking {
    /// Derives the blocking of an `mr × nr` kernel on `caches` for elements
    /// of `element_bytes` bytes, in vectors of `lanes` elements.
    pub fn derive(
        caches: &CacheHierarchy,
        mr: usize,
        nr: usize,
        element_bytes: usize,
        lanes: usize,
    ) -> ModelBlocking {
        let (mr, nr, s, lanes) = (mr.max(1), nr.max(1), element_bytes.max(1), lanes.max(1));
        let ways_for = |bytes: usize, way: usize| bytes.div_ceil(way.max(1));

        // KC: L1 holds the B micro-panel; A's micro-panels stream.
        let l1 = caches.l1d;
        let spare1 = l1.ways.saturating_sub(1).max(1);
        // A tile much wider than tall would get no way for A by the
        // proportional split: A then gets one and B's ways bound KC.
        let l1_a_ways = (spare1 * mr / (mr + nr)).clamp(1, spare1.saturating_sub(1).max(1));
        let l1_b_room = spare1.saturating_sub(l1_a_ways).max(1);
        let kc_l1 = (l1_a_ways * per_core_way(&l1) / (mr * s))
            .min(l1_b_room * per_core_way(&l1) / (nr * s));
        let l1_b_ways = ways_for((kc_l1 / 8 * 8) * nr * s, per_core_way(&l1));

        // Or one way of L2 holds it, where L2 can feed the kernel.
        let l2 = caches.l2;
        let l2_feed_bytes_per_cycle = (2 * (mr + nr) * s * lanes).div_ceil(mr * nr);
        let kc_l2 = per_core_way(&l2) / (nr * s);
        let depth = |kc: usize| (kc / 8 * 8).clamp(KC_RANGE.0, KC_RANGE.1);
        let (b_panel_level, kc) =
            if depth(kc_l2) > depth(kc_l1) && 2 * l2_feed_bytes_per_cycle <= L2_BYTES_PER_CYCLE {
                (2, depth(kc_l2))
            } else {
                (1, depth(kc_l1))
            };

        // MC: L2 holds the A block; the B micro-panel passes through (or
        // stays).
        let l2_b_ways = ways_for(kc * nr * s, per_core_way(&l2));
        let l2_a_ways = l2.ways.saturating_sub(1 + l2_b_ways).max(1);
        let mc_l2 = l2_a_ways * per_core_way(&l2) / (kc * s);
        let mc = (mc_l2 / mr * mr).clamp(mr, MC_MAX / mr * mr);

        // NC: this core's share of L3 holds the B block; A passes through.
        let nc_cap = MAX_B_BLOCK_BYTES / (kc * s);
        let (l3_a_ways, l3_b_ways, nc_l3) = match caches.l3 {
            Some(l3) => {
                let way = per_core_way(&l3);
                let a_ways = ways_for(mc * kc * s, way);
                let b_ways = l3.ways.saturating_sub(1 + a_ways);
                (a_ways, b_ways, b_ways * way / (kc * s))
            }
            None => (0, 0, nc_cap),
        };
        let nc = (nc_l3.min(nc_cap) / nr * nr).max(nr);

        // Tall A: with the B micro-panel in L2, the A block in this core's
        // share of L3 beside a B block of half of L2.
        let (l3_tall_b_ways, tall_mc) = match caches.l3 {
            Some(l3) if b_panel_level == 2 => {
                let way = per_core_way(&l3);
                let b_ways = ways_for(l2.per_core() / 2, way);
                let a_ways = l3.ways.saturating_sub(1 + b_ways);
                let rows = (a_ways * way / (kc * s) / mr * mr).min(MC_MAX / mr * mr);
                if rows > mc {
                    (b_ways, rows)
                } else {
                    (0, 0)
                }
            }
            _ => (0, 0),
        };
        ModelBlocking {
            mr,
            nr,
            element_bytes: s,
            l1_a_ways,
            l1_b_ways,
            kc_l1,
            l2_feed_bytes_per_cycle,
            b_panel_level,
            l2_b_ways,
            l2_a_ways,
            l3_a_ways,
            l3_b_ways,
            kc,
            mc,
            nc,
            l3_tall_b_ways,
            tall_mc,
        }
    }
}

/// One way's worth of this core's share of `cache`: a cache shared by `p`
/// CPUs is modelled as each of them owning `1/p` of every way.
fn per_core_way(cache: &CacheLevel) -> usize {
    (cache.way_bytes() / cache.shared_by.max(1)).max(cache.line.max(1))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gemm::cache::CacheSource;

    const KIB: usize = 1024;
    const MIB: usize = 1024 * 1024;

    fn cpu(l1d: CacheLevel, l2: CacheLevel, l3: Option<CacheLevel>) -> CacheHierarchy {
        CacheHierarchy {
            l1d,
            l2,
            l3,
            source: CacheSource::Os,
        }
    }

    /// Cache descriptions of CPUs we may not have (vendor documentation),
    /// as a guest with one thread per core sees them: L1 and L2 private, L3
    /// shared by every thread of its die or CCX.
    fn cpus() -> Vec<(&'static str, CacheHierarchy)> {
        vec![
            (
                // 8-core CCX, SMT2: L3 shared by 16 threads.
                "AMD Zen 4",
                cpu(
                    CacheLevel::new(32 * KIB, 64, 8),
                    CacheLevel::new(MIB, 64, 8),
                    Some(CacheLevel::new(32 * MIB, 64, 16).shared(16)),
                ),
            ),
            (
                "AMD Zen 5",
                cpu(
                    CacheLevel::new(48 * KIB, 64, 12),
                    CacheLevel::new(MIB, 64, 16),
                    Some(CacheLevel::new(32 * MIB, 64, 16).shared(16)),
                ),
            ),
            (
                // 28 cores, 38.5 MiB non-inclusive L3, SMT2.
                "Intel Skylake-SP",
                cpu(
                    CacheLevel::new(32 * KIB, 64, 8),
                    CacheLevel::new(MIB, 64, 16),
                    Some(CacheLevel::new(385 * MIB / 10, 64, 11).shared(56)),
                ),
            ),
            (
                // 56 cores, 105 MiB L3, SMT2.
                "Intel Sapphire Rapids",
                cpu(
                    CacheLevel::new(48 * KIB, 64, 12),
                    CacheLevel::new(2 * MIB, 64, 16),
                    Some(CacheLevel::new(105 * MIB, 64, 15).shared(112)),
                ),
            ),
            (
                // Performance cluster: 128 KiB L1d, 12 MiB L2 shared by four
                // cores with 128-byte lines; the system cache is not
                // visible to the core.
                "Apple M1 (P core)",
                cpu(
                    CacheLevel::new(128 * KIB, 64, 8),
                    CacheLevel::new(12 * MIB, 128, 12).shared(4),
                    None,
                ),
            ),
            ("assumed", CacheHierarchy::ASSUMED),
        ]
    }

    /// Register tiles of every path (AVX-512 8×32 and its 32×8 column
    /// kernel, AVX2 6×16 and its 16×6, portable 6×8) and two shapes no path
    /// has yet.
    const TILES: [(usize, usize); 7] =
        [(8, 32), (32, 8), (6, 16), (16, 6), (6, 8), (6, 32), (4, 64)];

    /// The constraints the module documents, on every CPU and tile: each
    /// operand fits the ways it was given, the ways add up, and the sizes
    /// are whole tiles within the clamps.
    #[test]
    fn every_block_fits_the_ways_the_model_gives_it() {
        for (name, caches) in cpus() {
            for (mr, nr) in TILES {
                let b = ModelBlocking::derive(&caches, mr, nr, 4, 16);
                let ctx = format!("{name}, {mr}×{nr}: {b:?}");
                assert!(b.kc.is_multiple_of(8), "{ctx}");
                assert!((KC_RANGE.0..=KC_RANGE.1).contains(&b.kc), "{ctx}");
                assert!(
                    b.mc.is_multiple_of(mr) && b.mc >= mr && b.mc <= MC_MAX,
                    "{ctx}"
                );
                assert!(b.nc.is_multiple_of(nr) && b.nc >= nr, "{ctx}");
                assert!(
                    b.kc * b.nc * 4 <= MAX_B_BLOCK_BYTES.max(b.kc * nr * 4),
                    "{ctx}"
                );

                let l1 = caches.l1d;
                let l1_way = per_core_way(&l1);
                if b.b_panel_level == 1 {
                    // L1: A's micro-panel in its ways, B's in the rest, one
                    // way spare (unless KC hit its floor).
                    if b.kc_l1 >= KC_RANGE.0 {
                        assert!(mr * b.kc * 4 <= b.l1_a_ways * l1_way, "{ctx}");
                        assert!(nr * b.kc * 4 <= b.l1_b_ways * l1_way, "{ctx}");
                        assert!(b.l1_a_ways + b.l1_b_ways < l1.ways, "{ctx}");
                    }
                } else {
                    // L2 holds the B micro-panel in one way, and can feed
                    // the kernel at half its bandwidth; only where that is
                    // deeper than L1 allows.
                    assert_eq!(b.b_panel_level, 2, "{ctx}");
                    assert!(2 * b.l2_feed_bytes_per_cycle <= L2_BYTES_PER_CYCLE, "{ctx}");
                    assert!(
                        b.kc > (b.kc_l1 / 8 * 8).clamp(KC_RANGE.0, KC_RANGE.1),
                        "{ctx}"
                    );
                    assert_eq!(b.l2_b_ways, 1, "{ctx}");
                }
                // L2: the A block plus the passing B micro-panel, one way
                // spare, unless MC hit its floor of one tile.
                let l2_way = per_core_way(&caches.l2);
                if b.mc > mr {
                    assert!(b.mc * b.kc * 4 <= b.l2_a_ways * l2_way, "{ctx}");
                    assert!(b.l2_a_ways + b.l2_b_ways < caches.l2.ways, "{ctx}");
                }
                assert!(nr * b.kc * 4 <= b.l2_b_ways * l2_way, "{ctx}");
                // L3 share: the B block plus the passing A block.
                if let Some(l3) = caches.l3 {
                    let way = per_core_way(&l3);
                    if b.nc > nr {
                        assert!(b.kc * b.nc * 4 <= b.l3_b_ways.max(1) * way, "{ctx}");
                        assert!(b.l3_a_ways + b.l3_b_ways < l3.ways, "{ctx}");
                    }
                    assert!(b.mc * b.kc * 4 <= b.l3_a_ways * way, "{ctx}");
                }
                // Tall A: only where B's micro-panel lives in L2; the A
                // block and the half-L2 B block share L3, one way spare.
                if b.tall_mc > 0 {
                    let l3 = caches.l3.expect("tall A needs an L3");
                    let way = per_core_way(&l3);
                    assert_eq!(b.b_panel_level, 2, "{ctx}");
                    assert!(b.tall_mc > b.mc && b.tall_mc <= MC_MAX, "{ctx}");
                    assert!(b.tall_mc.is_multiple_of(mr), "{ctx}");
                    assert!(caches.l2.per_core() / 2 <= b.l3_tall_b_ways * way, "{ctx}");
                    let a_ways = l3.ways - 1 - b.l3_tall_b_ways;
                    assert!(b.tall_mc * b.kc * 4 <= a_ways * way, "{ctx}");
                } else {
                    assert_eq!(b.l3_tall_b_ways, 0, "{ctx}");
                }
            }
        }
    }

    /// The figures the module doc's formulas give on two CPUs, worked by
    /// hand for the AVX-512 8×32 tile.
    #[test]
    fn worked_examples() {
        let cpus = cpus();
        let find = |n: &str| cpus.iter().find(|(name, _)| *name == n).unwrap().1;
        // Zen 5: L1 48 KiB / 12 ways = 4 KiB a way; C_A = ⌊11·8/40⌋ = 2;
        // kc₁ = 2·4096/32 = 256 (B panel 32 KiB = 8 ways). A k-step reads
        // 160 bytes in 8 cycles: 20 B/cycle from L2, under half of 64, so
        // B stays in one 64 KiB way of L2: kc = 65536/128 = 512 (the
        // cap). A block 14 ways: mc = 14·65536/2048 = 448. L3 share: 16
        // ways of 2 MiB / 16 = 128 KiB: A (896 KiB) 7 ways, B 8: nc =
        // 8·131072/2048 = 512.
        let z5 = ModelBlocking::derive(&find("AMD Zen 5"), 8, 32, 4, 16);
        assert_eq!((z5.l1_a_ways, z5.l1_b_ways, z5.kc_l1), (2, 8, 256));
        assert_eq!((z5.l2_feed_bytes_per_cycle, z5.b_panel_level), (20, 2));
        assert_eq!(z5.kc, 512);
        assert_eq!((z5.l2_b_ways, z5.l2_a_ways, z5.mc), (1, 14, 448));
        assert_eq!((z5.l3_a_ways, z5.l3_b_ways, z5.nc), (7, 8, 512));
        // Zen 4: 8 ways of 4 KiB: C_A = ⌊7·8/40⌋ = 1, kc₁ = 128; L2 ways
        // of 128 KiB: kc = 1024, capped at 512; B 1 way, A 6 ways: mc =
        // 6·131072/2048 = 384. L3: A (768 KiB) 6 ways, B 9: nc = 576.
        let z4 = ModelBlocking::derive(&find("AMD Zen 4"), 8, 32, 4, 16);
        assert_eq!((z4.l1_a_ways, z4.kc_l1, z4.kc), (1, 128, 512));
        assert_eq!((z4.l2_a_ways, z4.mc), (6, 384));
        assert_eq!((z4.l3_a_ways, z4.l3_b_ways, z4.nc), (6, 9, 576));
        // Tall A on both: the half-L2 B block (512 KiB) takes 4 of the
        // 16 ways of the 2 MiB share (128 KiB each), A gets 11: 11·131072
        // / 2048 = 704 rows, taller than MC.
        assert_eq!((z5.l3_tall_b_ways, z5.tall_mc), (4, 704));
        assert_eq!((z4.l3_tall_b_ways, z4.tall_mc), (4, 704));
        // Sapphire Rapids: a core's share of a 15-way L3 is 64 KiB a way,
        // and half its 2 MiB L2 would take 16: no tall-A blocks. Skylake-SP
        // (11 ways of 64 KiB, B 8): 2 ways hold 64 rows, under MC.
        let spr = ModelBlocking::derive(&find("Intel Sapphire Rapids"), 8, 32, 4, 16);
        assert_eq!((spr.b_panel_level, spr.tall_mc), (2, 0));
        let skx = ModelBlocking::derive(&find("Intel Skylake-SP"), 8, 32, 4, 16);
        assert_eq!(skx.tall_mc, 0);
        // A 4×64 tile would need 34 B/cycle from L2: B stays in L1.
        let wide = ModelBlocking::derive(&find("AMD Zen 5"), 4, 64, 4, 16);
        assert_eq!((wide.l2_feed_bytes_per_cycle, wide.b_panel_level), (34, 1));
        assert_eq!(wide.tall_mc, 0);
        assert_eq!(wide.kc, wide.kc_l1 / 8 * 8);
    }
}
