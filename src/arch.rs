//! What the CPU can run: the instruction-set paths of the GEMM and direct
//! kernels, detected once per process, and the `CPUCONV_ISA` override.
//!
//! Both the GEMM micro-kernels and the SIMD direct convolution dispatch on
//! [`Isa`]; this module is the only place that asks the CPU about its
//! features. A path is usable only when the CPU reports *every* feature its
//! kernels are compiled with ([`Isa::required_features`]), so a forced or
//! clamped path can never reach an illegal instruction, even on a CPU (or a
//! virtual machine) that reports a higher path without a lower one.

use std::fmt;
use std::sync::OnceLock;

/// An instruction-set path of the GEMM and direct kernels.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Isa {
    /// `wide` vectors: what every target compiles (NEON on aarch64, SSE2 on baseline x86-64).
    Portable,
    /// x86-64 AVX2 + FMA, 256-bit registers.
    Avx2,
    /// x86-64 AVX-512F (+ FMA), 512-bit registers.
    Avx512,
}

impl Isa {
    /// Every path, lowest first.
    pub const ALL: [Isa; 3] = [Isa::Portable, Isa::Avx2, Isa::Avx512];

    /// The name `CPUCONV_ISA` accepts.
    pub fn name(self) -> &'static str {
        match self {
            Isa::Portable => "portable",
            Isa::Avx2 => "avx2",
            Isa::Avx512 => "avx512",
        }
    }

    /// Parses a `CPUCONV_ISA` value.
    pub fn from_name(s: &str) -> Option<Isa> {
        Isa::ALL
            .into_iter()
            .find(|i| i.name().eq_ignore_ascii_case(s.trim()))
    }

    /// The CPU features every kernel of this path is compiled with (the
    /// `#[target_feature]` lists of its kernels), as
    /// `is_x86_feature_detected!` names them.
    pub fn required_features(self) -> &'static [&'static str] {
        match self {
            Isa::Portable => &[],
            Isa::Avx2 => &["avx2", "fma"],
            Isa::Avx512 => &["avx512f", "fma"],
        }
    }

    /// Whether this CPU can run the path: it reports every one of
    /// [`Isa::required_features`].
    pub fn is_supported(self) -> bool {
        static SUPPORTED: OnceLock<[bool; 3]> = OnceLock::new();
        SUPPORTED.get_or_init(|| Isa::ALL.map(|isa| has_features(isa.required_features())))
            [self.index()]
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }
}

impl fmt::Display for Isa {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Whether the CPU reports every feature in `features`.
fn has_features(features: &[&str]) -> bool {
    features.iter().all(|&f| has_feature(f))
}

#[cfg(target_arch = "x86_64")]
fn has_feature(feature: &str) -> bool {
    match feature {
        "avx2" => std::arch::is_x86_feature_detected!("avx2"),
        "fma" => std::arch::is_x86_feature_detected!("fma"),
        "avx512f" => std::arch::is_x86_feature_detected!("avx512f"),
        _ => false,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn has_feature(_feature: &str) -> bool {
    false
}

/// Who designed the CPU, by CPUID's vendor string: where the same
/// instructions run at different speeds by vendor, a measured choice
/// (AVX-512's register tile) and where the cache parameters are read
/// (CPUID leaf 4 or 0x8000001D) follow it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
// Other targets never read a vendor string, so build only `Other`.
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(crate) enum Vendor {
    /// "GenuineIntel".
    Intel,
    /// "AuthenticAMD", or Hygon's "HygonGenuine" (Zen cores).
    Amd,
    /// Any other, and every non-x86 target.
    Other,
}

/// This CPU's vendor, read once.
pub(crate) fn vendor() -> Vendor {
    static VENDOR: OnceLock<Vendor> = OnceLock::new();
    *VENDOR.get_or_init(read_vendor)
}

#[cfg(target_arch = "x86_64")]
fn read_vendor() -> Vendor {
    // `__cpuid` became a safe function in later toolchains than our
    // minimum; the block keeps both compiling.
    #[allow(unused_unsafe)]
    // SAFETY: CPUID exists on every x86-64 CPU and only reads identification
    // registers.
    let leaf = unsafe { core::arch::x86_64::__cpuid(0) };
    // The vendor string is EBX, EDX, ECX; its first four bytes tell these
    // apart.
    match &leaf.ebx.to_le_bytes() {
        b"Genu" => Vendor::Intel,
        b"Auth" | b"Hygo" => Vendor::Amd,
        _ => Vendor::Other,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn read_vendor() -> Vendor {
    Vendor::Other
}

/// The best path this CPU supports, ignoring `CPUCONV_ISA`.
pub fn detected_isa() -> Isa {
    clamp_isa(Isa::Avx512)
}

/// Every path this CPU supports, lowest first.
pub fn supported_isas() -> Vec<Isa> {
    Isa::ALL.into_iter().filter(|i| i.is_supported()).collect()
}

/// The highest path not above `wanted` that this CPU supports. Each path is
/// checked on its own features: supporting a higher path does not imply
/// supporting a lower one.
pub fn clamp_isa(wanted: Isa) -> Isa {
    highest_supported(wanted, Isa::is_supported)
}

/// The highest path `≤ wanted` for which `supported` holds (`Portable` at
/// worst, which every CPU runs).
fn highest_supported(wanted: Isa, supported: impl Fn(Isa) -> bool) -> Isa {
    Isa::ALL
        .into_iter()
        .rev()
        .find(|&i| i <= wanted && (i == Isa::Portable || supported(i)))
        .unwrap_or(Isa::Portable)
}

/// Defines `fn $name(isa, args…)` that runs `$body(args…)` compiled with
/// the target features of `isa`'s kernels (clamped to the CPU first), so
/// that plain loops in `$body` (an `#[inline(always)]` function, such as
/// col2im's adds) are vectorised for the path's registers rather than for
/// the crate's baseline target: the loop is written once, and only this
/// knows the ISA. (A closure handed to a `#[target_feature]` function is
/// not inlined into it, hence one wrapper per function.)
macro_rules! with_isa_features {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),* $(,)?) = $body:path;) => {
        $(#[$meta])*
        $vis fn $name(isa: $crate::arch::Isa, $($arg: $ty),*) {
            /// The body with the AVX-512 path's features.
            ///
            /// # Safety
            /// The CPU supports AVX-512F and FMA.
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx512f,fma")]
            unsafe fn avx512($($arg: $ty),*) {
                $body($($arg),*)
            }
            /// The body with the AVX2 path's features.
            ///
            /// # Safety
            /// The CPU supports AVX2 and FMA.
            #[cfg(target_arch = "x86_64")]
            #[target_feature(enable = "avx2,fma")]
            unsafe fn avx2($($arg: $ty),*) {
                $body($($arg),*)
            }
            match $crate::arch::clamp_isa(isa) {
                // SAFETY: the clamped path is one the CPU supports.
                #[cfg(target_arch = "x86_64")]
                $crate::arch::Isa::Avx512 => unsafe { avx512($($arg),*) },
                // SAFETY: as above.
                #[cfg(target_arch = "x86_64")]
                $crate::arch::Isa::Avx2 => unsafe { avx2($($arg),*) },
                _ => $body($($arg),*),
            }
        }
    };
}
pub(crate) use with_isa_features;

/// The path in use when a call does not name one: the detected path, or the
/// one `CPUCONV_ISA` forces. A forced path the CPU cannot run falls back to
/// the highest supported path below it, with a warning on stderr.
pub fn isa() -> Isa {
    static ACTIVE: OnceLock<Isa> = OnceLock::new();
    *ACTIVE.get_or_init(|| {
        let best = detected_isa();
        let Ok(value) = std::env::var("CPUCONV_ISA") else {
            return best;
        };
        if value.trim().is_empty() || value.trim().eq_ignore_ascii_case("native") {
            return best;
        }
        match Isa::from_name(&value) {
            Some(wanted) if wanted.is_supported() => wanted,
            Some(wanted) => {
                let used = clamp_isa(wanted);
                eprintln!(
                    "cpuconv: CPUCONV_ISA={wanted} is not supported by this CPU; using {used}"
                );
                used
            }
            None => {
                eprintln!(
                    "cpuconv: CPUCONV_ISA={value:?} is not one of avx512, avx2, portable; \
                     using {best}"
                );
                best
            }
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isa_names_round_trip() {
        for isa in Isa::ALL {
            assert_eq!(Isa::from_name(isa.name()), Some(isa));
        }
        assert_eq!(Isa::from_name("AVX512"), Some(Isa::Avx512));
        assert_eq!(Isa::from_name("sse"), None);
        assert!(Isa::Portable.is_supported());
        assert!(clamp_isa(Isa::Avx512) <= detected_isa());
    }

    /// A CPU (or VM) that reports AVX-512F + FMA but not AVX2: asking for
    /// AVX2 must not get AVX2, and asking for AVX-512 gets AVX-512.
    #[test]
    fn clamping_checks_each_path_on_its_own() {
        let avx512_without_avx2 = |i: Isa| i == Isa::Avx512;
        assert_eq!(
            highest_supported(Isa::Avx2, avx512_without_avx2),
            Isa::Portable
        );
        assert_eq!(
            highest_supported(Isa::Avx512, avx512_without_avx2),
            Isa::Avx512
        );
        let avx2_only = |i: Isa| i == Isa::Avx2;
        assert_eq!(highest_supported(Isa::Avx512, avx2_only), Isa::Avx2);
        assert_eq!(highest_supported(Isa::Portable, |_| true), Isa::Portable);
        for wanted in Isa::ALL {
            let got = clamp_isa(wanted);
            assert!(got <= wanted && got.is_supported());
        }
    }
}
