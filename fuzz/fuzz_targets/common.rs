//! Pieces shared by the fuzz targets: value generators that draw small
//! values most of the time and extreme ones some of the time, a tiny
//! deterministic RNG for bulk data, and the choices of ISA and threading.
#![allow(dead_code)]

use arbitrary::{Arbitrary, Result, Unstructured};
use cpuconv::{Isa, Parallelism};
use std::fmt;
use std::num::NonZeroUsize;
use std::sync::Once;

/// Values every size-like parameter sometimes takes: zero, one, powers of two
/// at the 32/63/64-bit boundaries, square roots of them (products overflow),
/// and the top of `usize`.
pub const EXTREME_USIZE: [usize; 16] = [
    0,
    1,
    2,
    3,
    1 << 16,
    46_341, // ⌈√2³¹⌉
    (1 << 31) - 1,
    1 << 31,
    1 << 32,
    3_037_000_500, // ⌈√2⁶³⌉
    1 << 62,
    (1 << 63) - 1,
    1 << 63,
    usize::MAX / 3,
    usize::MAX - 1,
    usize::MAX,
];

/// A `usize` drawn as: 200/256 of the time a small value in
/// `LO..LO + SMALL`, 40/256 a medium one in `LO..=LO + MEDIUM`, and 16/256
/// one of [`EXTREME_USIZE`]. An exhausted input gives `LO`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Val<const LO: usize, const SMALL: usize, const MEDIUM: usize>(pub usize);

impl<const LO: usize, const SMALL: usize, const MEDIUM: usize> fmt::Debug
    for Val<LO, SMALL, MEDIUM>
{
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl<'a, const LO: usize, const SMALL: usize, const MEDIUM: usize> Arbitrary<'a>
    for Val<LO, SMALL, MEDIUM>
{
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let tag = u8::arbitrary(u)?;
        Ok(Val(match tag {
            0..=199 => LO + tag as usize % SMALL,
            200..=239 => LO + u8::arbitrary(u)? as usize % (MEDIUM + 1),
            _ => EXTREME_USIZE[(tag - 240) as usize],
        }))
    }

    fn size_hint(_depth: usize) -> (usize, Option<usize>) {
        (1, Some(2))
    }
}

/// Strides: small signed values most of the time, else the isize extremes.
pub const EXTREME_ISIZE: [isize; 16] = [
    isize::MIN,
    isize::MIN + 1,
    isize::MAX,
    -(1 << 62),
    1 << 62,
    -(1 << 31),
    1 << 31,
    1 << 32,
    3_037_000_500,
    -3_037_000_500,
    isize::MAX / 3,
    0,
    -1,
    33,
    1025,
    -4097,
];

/// A stride: 200/256 of the time in `-6..=6`, 40/256 in `-64..=64`, else one
/// of [`EXTREME_ISIZE`].
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Stride(pub isize);

impl fmt::Debug for Stride {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

impl<'a> Arbitrary<'a> for Stride {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let tag = u8::arbitrary(u)?;
        Ok(Stride(match tag {
            0..=199 => (tag % 13) as isize - 6,
            200..=239 => (u8::arbitrary(u)? % 129) as isize - 64,
            _ => EXTREME_ISIZE[(tag - 240) as usize],
        }))
    }
}

/// A float for scalars and clamp bounds: usually a small "nice" value,
/// sometimes a special one (NaN, ±∞, ±0, extremes, subnormal).
#[derive(Clone, Copy, PartialEq)]
pub struct Scalar(pub f32);

impl fmt::Debug for Scalar {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:?}", self.0)
    }
}

pub const SPECIAL_F32: [f32; 10] = [
    f32::NAN,
    f32::INFINITY,
    f32::NEG_INFINITY,
    0.0,
    -0.0,
    f32::MAX,
    -f32::MAX,
    1e-40, // subnormal
    f32::MIN_POSITIVE,
    1.0,
];

impl<'a> Arbitrary<'a> for Scalar {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        let tag = u8::arbitrary(u)?;
        Ok(Scalar(match tag {
            // Quarter steps in [-4, 4): exact, and often equal to each other.
            0..=219 => (tag % 32) as f32 / 4.0 - 4.0,
            220..=239 => f32::from_bits(u32::arbitrary(u)?),
            _ => SPECIAL_F32[(tag - 240) as usize % SPECIAL_F32.len()],
        }))
    }
}

/// A special value written into a data buffer at some position.
#[derive(Clone, Copy, Debug, Arbitrary)]
pub enum Special {
    Nan,
    Inf,
    NegInf,
    Max,
    NegMax,
    Subnormal,
    NegZero,
}

impl Special {
    pub fn value(self) -> f32 {
        match self {
            Special::Nan => f32::NAN,
            Special::Inf => f32::INFINITY,
            Special::NegInf => f32::NEG_INFINITY,
            Special::Max => f32::MAX,
            Special::NegMax => -f32::MAX,
            Special::Subnormal => 1e-40,
            Special::NegZero => -0.0,
        }
    }
}

/// Scale of the bulk data: `2^e` with `e` usually 0.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Scale(pub i32);

impl fmt::Debug for Scale {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "2^{}", self.0)
    }
}

impl<'a> Arbitrary<'a> for Scale {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        const EXPONENTS: [i32; 8] = [-140, -100, -60, -20, 20, 60, 64, 127];
        let tag = u8::arbitrary(u)?;
        Ok(Scale(if tag < 224 {
            0
        } else {
            EXPONENTS[(tag - 224) as usize % EXPONENTS.len()]
        }))
    }
}

impl Scale {
    pub fn factor(self) -> f32 {
        // powi keeps subnormal and overflowing scales honest (0 or ∞ are fine:
        // the comparisons skip non-finite data).
        2f64.powi(self.0) as f32
    }
}

/// SplitMix64.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `[-1, 1)`, 24 random bits.
    pub fn next_f32(&mut self) -> f32 {
        let u = (self.next_u64() >> 40) as f32 / (1u64 << 24) as f32;
        2.0 * u - 1.0
    }

    pub fn fill(&mut self, buf: &mut [f32], scale: f32) {
        for v in buf {
            *v = self.next_f32() * scale;
        }
    }
}

/// The ISA a call forces: `None` (the process default) or one of
/// [`Isa::ALL`], which the library clamps to what the CPU supports.
#[derive(Clone, Copy, Debug, Arbitrary)]
pub enum IsaSel {
    Default,
    Portable,
    Avx2,
    Avx512,
}

impl IsaSel {
    pub fn get(self) -> Option<Isa> {
        match self {
            IsaSel::Default => None,
            IsaSel::Portable => Some(Isa::ALL[0]),
            IsaSel::Avx2 => Some(Isa::ALL[1]),
            IsaSel::Avx512 => Some(Isa::ALL[2]),
        }
    }

    /// `None` then every ISA, for the loops that try them all.
    pub fn all() -> impl Iterator<Item = Option<Isa>> {
        std::iter::once(None).chain(Isa::ALL.into_iter().map(Some))
    }
}

/// A threaded setting: the whole pool, or a cap of 2..=4 threads.
#[derive(Clone, Copy, Debug, Arbitrary)]
pub enum ThreadedSel {
    Rayon,
    Capped(u8),
}

impl ThreadedSel {
    pub fn get(self) -> Parallelism {
        match self {
            ThreadedSel::Rayon => Parallelism::Rayon,
            ThreadedSel::Capped(n) => {
                Parallelism::RayonCapped(NonZeroUsize::new(2 + n as usize % 3).unwrap())
            }
        }
    }
}

/// Threads of the global rayon pool. Three, whatever the machine, so that
/// work splits unevenly and the threaded paths run on a two-core box too.
pub const POOL_THREADS: usize = 3;

pub fn init_pool() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let _ = rayon::ThreadPoolBuilder::new()
            .num_threads(POOL_THREADS)
            .build_global();
    });
}

/// Which of a buffer's length variants a call gets: the right one most of
/// the time, sometimes one off or empty.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LenSel {
    Exact,
    Minus1,
    Plus1,
    Zero,
}

impl<'a> Arbitrary<'a> for LenSel {
    fn arbitrary(u: &mut Unstructured<'a>) -> Result<Self> {
        Ok(match u8::arbitrary(u)? {
            0..=219 => LenSel::Exact,
            220..=231 => LenSel::Minus1,
            232..=243 => LenSel::Plus1,
            _ => LenSel::Zero,
        })
    }
}

impl LenSel {
    /// The length to allocate for a buffer that needs `exact` elements.
    pub fn apply(self, exact: usize) -> usize {
        match self {
            LenSel::Exact => exact,
            LenSel::Minus1 => exact.saturating_sub(1),
            LenSel::Plus1 => exact + 1,
            LenSel::Zero => 0,
        }
    }
}

/// Whether `got` is within `tol` of `want` (the f64 reference), treating
/// equal infinities as equal.
pub fn close(got: f32, want: f64, tol: f64) -> bool {
    if want.is_nan() {
        return got.is_nan();
    }
    got as f64 == want || (got as f64 - want).abs() <= tol
}
