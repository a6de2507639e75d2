//! Wisdom, FFTW's word: the choices [`PlanEffort::Measure`](crate::PlanEffort::Measure) plans have made
//! in this process, kept per layer so that the next plan of the same layer
//! takes the choice instead of measuring again, and exportable as a small
//! string so that a framework can measure once per machine and ship it.
//!
//! ```
//! use cpuconv::{wisdom, Algorithm, ChoiceSource, Conv2dParams, ForwardOptions, PlanEffort};
//! let conv = Conv2dParams::new(1, 8, (10, 10), 24, (3, 3)).build()?;
//! let weight = vec![0.1f32; conv.geometry().weight_len()];
//! let measure = ForwardOptions::new(Algorithm::Auto).effort(PlanEffort::Measure);
//! let measured = conv.plan(&weight, None, &measure)?;
//!
//! // Save it (a file, a model's metadata) ...
//! let text = wisdom::export();
//! assert!(text.starts_with("cpuconv-wisdom 1\n"));
//!
//! // ... and, in another run on this machine, load it before planning.
//! wisdom::forget();
//! assert_eq!(wisdom::import(&text)?, 1);
//! let only = ForwardOptions::new(Algorithm::Auto).effort(PlanEffort::WisdomOnly);
//! let plan = conv.plan(&weight, None, &only)?;
//! assert_eq!(plan.choice().source, ChoiceSource::Wisdom);
//! assert_eq!(plan.choice().algorithm, measured.choice().algorithm);
//! assert!(wisdom::import("cpuconv-wisdom 1\nisa=avx512 cap=two").is_err());
//! # Ok::<(), cpuconv::ConvError>(())
//! ```
//!
//! # Format
//!
//! Line-based text: a header `cpuconv-wisdom 1` (the format's version),
//! then one entry per line, each a list of `key=value` tokens separated by
//! spaces, every key once, in any order; blank lines and lines starting
//! with `#` are skipped. An entry, as [`export`] writes it:
//!
//! ```text
//! isa=avx512 cap=2 request=auto input=1x64x56x56 out=64 kernel=3x3 stride=1x1 pad=1,1,1,1 dilation=1x1 groups=1 mode=xcorr algorithm=direct-dense threads=1
//! ```
//!
//! The key of the choice: `isa`, the kernel path the request resolves to
//! (`avx512`, `avx2`, `portable`: the CPU's best path, the one
//! `CPUCONV_ISA` sets, or the one [`ForwardOptions::isa`](crate::ForwardOptions::isa) forces; an entry for
//! another path never applies, so wisdom from another machine is ignored
//! rather than misapplied); `cap`, the most threads the caller allowed; `request`, the algorithm
//! asked for (`auto`, or an explicit one whose thread split was measured);
//! the layer: `input` `NxCxHxW`, `out` (K), `kernel` `RxS`, `stride` and
//! `dilation` (vertical x horizontal), `pad` (top, bottom, left, right),
//! `groups`, `mode` (`xcorr` for cross-correlation, `conv` for the flipped
//! kernel). Bias and activation are not part of it: they cost the same in
//! every algorithm's store. The choice: `algorithm`
//! ([`Algorithm::name`]), `threads` (1 to `cap`) and, optionally,
//! `run_isa`, the path the plan runs when it is not `isa`:
//!
//! ```text
//! isa=avx512 cap=1 request=auto input=1x64x56x56 out=64 kernel=3x3 stride=1x1 pad=1,1,1,1 dilation=1x1 groups=1 mode=xcorr algorithm=direct-dense threads=1 run_isa=avx2
//! ```
//!
//! says that on an AVX-512 CPU, for a request that forced no path, the
//! AVX2 kernels were measured faster (see [`crate::conv::measure`] on
//! why that can happen). `run_isa` is never above `isa` (an error
//! otherwise: it would overrule a lower path forced by `CPUCONV_ISA` or
//! the caller). An entry whose `run_isa` this CPU cannot run is ignored,
//! not an error (a `Measure` plan measures again and replaces it), and so
//! is an entry that runs another path than the one a request forces with
//! [`ForwardOptions::isa`](crate::ForwardOptions::isa): a forced path is always the path a plan runs.
//!
//! A transposed convolution's entry ([`ConvTranspose2d::plan`](crate::ConvTranspose2d::plan)) has
//! `op=transpose`, and places its output with `offset` (the window's
//! offset, vertical then horizontal, the padding before; it may be
//! negative) and `output` (`HxW`) instead of `pad`; `input` is its input,
//! `out` its output channels. Its choice may be `auto`: the sub-pixel
//! phases, each with its own `Auto` choice.
//!
//! ```text
//! isa=avx512 cap=1 request=auto input=8x256x8x8 out=128 kernel=4x4 stride=2x2 op=transpose offset=1,1 output=16x16 dilation=1x1 groups=1 mode=xcorr algorithm=im2col threads=1
//! ```
//!
//! Those keys are new in this version of the crate, and so an earlier
//! version refuses a text with a transposed entry (as an unknown key
//! `op=...`); every text it wrote reads as before.
//!
//! `run_isa` is written only where it differs from `isa`, and an entry
//! without it runs `isa`. So the format keeps its version 1: a text whose
//! entries all run their key's path is what earlier versions of this crate
//! wrote and read, every text they wrote reads as before, and only an entry
//! that runs another path is refused by them, as an unknown key naming
//! `run_isa=...` (they could not have honoured it).
//!
//! The store is process-global and thread-safe; import adds to it
//! (replacing entries with the same key).

use super::phases::TransposedGeometry;
use super::Algorithm;
use crate::arch::Isa;
use crate::error::ConvError;
use crate::geometry::{ConvGeometry, ConvMode};
use std::collections::HashMap;
use std::fmt::Write as _;
use std::sync::{Mutex, MutexGuard, PoisonError};

/// The first line of the format, with its version.
pub const HEADER: &str = "cpuconv-wisdom 1";

/// Everything a measured choice depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct Key {
    isa: Isa,
    cap: usize,
    request: Algorithm,
    input: [usize; 4],
    out: usize,
    kernel: [usize; 2],
    stride: [usize; 2],
    pad: [usize; 4],
    dilation: [usize; 2],
    groups: usize,
    mode: ConvMode,
    /// A transposed convolution's layer: its window offsets and output
    /// size (its `pad` is then unused, all zero); `None` for a convolution.
    transposed: Option<TransposedLayer>,
}

/// What places a transposed convolution's output, per axis (vertical,
/// horizontal): the window's offset (its padding before) and the output
/// size.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub(crate) struct TransposedLayer {
    offset: [isize; 2],
    output: [usize; 2],
}

impl Key {
    pub(crate) fn new(g: &ConvGeometry, isa: Isa, cap: usize, request: Algorithm) -> Key {
        let p = g.padding;
        Key {
            isa,
            cap,
            request,
            input: [g.batch, g.in_channels, g.in_h, g.in_w],
            out: g.out_channels,
            kernel: [g.kernel_h, g.kernel_w],
            stride: [g.stride_h, g.stride_w],
            pad: [p.top, p.bottom, p.left, p.right],
            dilation: [g.dilation_h, g.dilation_w],
            groups: g.groups,
            mode: g.mode,
            transposed: None,
        }
    }

    /// The key of a transposed convolution `tg` (input `[N, C_in, H, W]`,
    /// `out` = `C_out`).
    pub(crate) fn transposed(
        tg: &TransposedGeometry,
        isa: Isa,
        cap: usize,
        request: Algorithm,
    ) -> Key {
        let (h, w) = (&tg.h, &tg.w);
        Key {
            isa,
            cap,
            request,
            input: [tg.batch, tg.in_channels, h.input, w.input],
            out: tg.out_channels,
            kernel: [h.kernel, w.kernel],
            stride: [h.stride, w.stride],
            pad: [0; 4],
            dilation: [h.dilation, w.dilation],
            groups: tg.groups,
            mode: tg.mode,
            transposed: Some(TransposedLayer {
                offset: [h.offset, w.offset],
                output: [h.output, w.output],
            }),
        }
    }
}

/// A measured choice.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Choice {
    pub(crate) algorithm: Algorithm,
    pub(crate) threads: usize,
    /// The path the plan runs: the key's, or one below it.
    pub(crate) run_isa: Isa,
}

static STORE: Mutex<Option<HashMap<Key, Choice>>> = Mutex::new(None);

/// The store (a panic elsewhere while it was held leaves it whole: every
/// change is one insert or one clear).
fn store() -> MutexGuard<'static, Option<HashMap<Key, Choice>>> {
    STORE.lock().unwrap_or_else(PoisonError::into_inner)
}

pub(crate) fn lookup(key: &Key) -> Option<Choice> {
    store().as_ref()?.get(key).copied()
}

pub(crate) fn record(key: Key, choice: Choice) {
    store().get_or_insert_with(HashMap::new).insert(key, choice);
}

/// Every choice in the store, as text ([module docs](self) for the
/// format): the header line, then one line per entry, sorted, each ending
/// in a newline.
pub fn export() -> String {
    let mut lines: Vec<String> = store()
        .as_ref()
        .map(|m| m.iter().map(|(k, c)| entry_line(k, c)).collect())
        .unwrap_or_default();
    lines.sort_unstable();
    let mut text = format!("{HEADER}\n");
    for line in lines {
        text.push_str(&line);
        text.push('\n');
    }
    text
}

/// Adds the entries of `text` (as [`export`] writes it) to the store,
/// replacing any with the same key, and returns how many it read. The
/// whole text is checked first: on an error nothing is added.
///
/// # Errors
/// [`ConvError::InvalidWisdom`] naming the line and the token at fault: a
/// missing or unknown header or version, a token that is not `key=value`,
/// an unknown, repeated or missing key, a value that does not parse (a
/// number, a size of 0, an unknown ISA, algorithm or mode), an `auto`
/// choice, `threads` above `cap`, `run_isa` above `isa`, or a choice that
/// differs from an explicit `request`. (A `run_isa` this CPU cannot run is
/// no error: the entry is read and never applies.)
pub fn import(text: &str) -> Result<usize, ConvError> {
    let mut entries = Vec::new();
    let mut header = false;
    for (i, line) in text.lines().enumerate() {
        let n = i + 1;
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if !header {
            check_header(n, line)?;
            header = true;
            continue;
        }
        entries.push(parse_entry(n, line)?);
    }
    if !header {
        return Err(bad(text.lines().count().max(1), "", "no header line"));
    }
    let count = entries.len();
    let mut guard = store();
    let map = guard.get_or_insert_with(HashMap::new);
    for (key, choice) in entries {
        map.insert(key, choice);
    }
    Ok(count)
}

/// Empties the store: the next [`PlanEffort::Measure`](crate::PlanEffort::Measure) plan of any layer
/// measures again.
pub fn forget() {
    *store() = None;
}

fn bad(line: usize, token: &str, reason: &'static str) -> ConvError {
    ConvError::InvalidWisdom {
        line,
        token: token.to_string(),
        reason,
    }
}

fn check_header(n: usize, line: &str) -> Result<(), ConvError> {
    let mut tokens = line.split_whitespace();
    let magic = HEADER.split(' ').next().unwrap_or_default();
    match (tokens.next(), tokens.next(), tokens.next()) {
        (Some(m), Some("1"), None) if m == magic => Ok(()),
        (Some(m), Some(version), None) if m == magic => {
            Err(bad(n, version, "unsupported wisdom version (this reads 1)"))
        }
        _ => Err(bad(n, line, "expected the header `cpuconv-wisdom 1`")),
    }
}

fn entry_line(k: &Key, c: &Choice) -> String {
    let x = |v: &[usize]| v.iter().map(usize::to_string).collect::<Vec<_>>().join("x");
    let mut s = String::new();
    // Writing to a String cannot fail.
    let place = match &k.transposed {
        None => format!("pad={},{},{},{}", k.pad[0], k.pad[1], k.pad[2], k.pad[3]),
        Some(t) => format!(
            "op=transpose offset={},{} output={}",
            t.offset[0],
            t.offset[1],
            x(&t.output)
        ),
    };
    let _ = write!(
        s,
        "isa={} cap={} request={} input={} out={} kernel={} stride={} {place} \
         dilation={} groups={} mode={} algorithm={} threads={}",
        k.isa.name(),
        k.cap,
        k.request.name(),
        x(&k.input),
        k.out,
        x(&k.kernel),
        x(&k.stride),
        x(&k.dilation),
        k.groups,
        mode_name(k.mode),
        c.algorithm.name(),
        c.threads,
    );
    // Only where it differs (see the module docs on the version).
    if c.run_isa != k.isa {
        let _ = write!(s, " run_isa={}", c.run_isa.name());
    }
    s
}

fn mode_name(mode: ConvMode) -> &'static str {
    match mode {
        ConvMode::CrossCorrelation => "xcorr",
        ConvMode::Convolution => "conv",
    }
}

/// The keys of an entry, in the order [`export`] writes them (`run_isa`
/// optional; `op`, `offset` and `output` for a transposed convolution's
/// entry only, which has no `pad`).
const KEYS: [&str; 17] = [
    "isa",
    "cap",
    "request",
    "input",
    "out",
    "kernel",
    "stride",
    "pad",
    "dilation",
    "groups",
    "mode",
    "algorithm",
    "threads",
    "run_isa",
    "op",
    "offset",
    "output",
];

fn parse_entry(n: usize, line: &str) -> Result<(Key, Choice), ConvError> {
    let keys = &KEYS;
    let mut values: [Option<&str>; KEYS.len()] = [None; KEYS.len()];
    for token in line.split_whitespace() {
        let (k, v) = token
            .split_once('=')
            .ok_or_else(|| bad(n, token, "expected key=value"))?;
        let slot = keys
            .iter()
            .position(|&name| name == k)
            .ok_or_else(|| bad(n, token, "unknown key"))?;
        if values[slot].replace(v).is_some() {
            return Err(bad(n, token, "repeated key"));
        }
    }
    let get = |i: usize| values[i].ok_or_else(|| bad(n, keys[i], "missing key"));
    let token = |i: usize, v: &str| format!("{}={v}", keys[i]);
    // A size: a number, at least 1 where `positive`.
    let number = |i: usize, v: &str, part: &str, positive: bool| -> Result<usize, ConvError> {
        let x: usize = part
            .parse()
            .map_err(|_| bad(n, &token(i, v), "not a number"))?;
        if positive && x == 0 {
            return Err(bad(n, &token(i, v), "must be at least 1"));
        }
        Ok(x)
    };
    let list = |i: usize, sep: char, len: usize, positive: bool| -> Result<Vec<usize>, ConvError> {
        let v = get(i)?;
        let parts: Vec<&str> = v.split(sep).collect();
        if parts.len() != len {
            return Err(bad(
                n,
                &token(i, v),
                "wrong number of values (input has 4, pad 4 separated by commas, kernel, \
                 stride and dilation 2 separated by x)",
            ));
        }
        parts.iter().map(|p| number(i, v, p, positive)).collect()
    };
    let one = |i: usize| -> Result<usize, ConvError> { Ok(list(i, 'x', 1, true)?[0]) };
    let pair = |i: usize| -> Result<[usize; 2], ConvError> {
        let v = list(i, 'x', 2, true)?;
        Ok([v[0], v[1]])
    };
    let isa_at = |i: usize, v: &str| -> Result<Isa, ConvError> {
        // `from_name` trims and ignores case; the format is exact.
        Isa::from_name(v)
            .filter(|isa| isa.name() == v)
            .ok_or_else(|| bad(n, &token(i, v), "unknown isa"))
    };
    let isa = isa_at(0, get(0)?)?;
    let cap = one(1)?;
    let algorithm_at = |i: usize| -> Result<Algorithm, ConvError> {
        let v = get(i)?;
        // `from_name` trims and ignores case; the format is exact.
        Algorithm::from_name(v)
            .filter(|a| a.name() == v)
            .ok_or_else(|| bad(n, &token(i, v), "unknown algorithm"))
    };
    let request = algorithm_at(2)?;
    let input = list(3, 'x', 4, true)?;
    let (pad, transposed) = match values[14] {
        None => {
            if let Some(i) = (15..17).find(|&i| values[i].is_some()) {
                return Err(bad(
                    n,
                    keys[i],
                    "only a transposed entry (op=transpose) has it",
                ));
            }
            (list(7, ',', 4, false)?, None)
        }
        Some("transpose") => {
            if values[7].is_some() {
                return Err(bad(n, keys[7], "a transposed entry has offset, not pad"));
            }
            let v = get(15)?;
            let offset: Vec<isize> = v
                .split(',')
                .map(|p| p.parse::<isize>().ok())
                .collect::<Option<_>>()
                .filter(|o: &Vec<isize>| o.len() == 2)
                .ok_or_else(|| {
                    bad(
                        n,
                        &token(15, v),
                        "expected two numbers separated by a comma",
                    )
                })?;
            let output = pair(16)?;
            (
                vec![0; 4],
                Some(TransposedLayer {
                    offset: [offset[0], offset[1]],
                    output,
                }),
            )
        }
        Some(v) => return Err(bad(n, &token(14, v), "unknown op (transpose)")),
    };
    let mode = match get(10)? {
        "xcorr" => ConvMode::CrossCorrelation,
        "conv" => ConvMode::Convolution,
        v => return Err(bad(n, &token(10, v), "unknown mode (xcorr or conv)")),
    };
    let algorithm = algorithm_at(11)?;
    // A transposed convolution's choice may be its sub-pixel phases, each
    // with its own `Auto` choice.
    if algorithm == Algorithm::Auto && transposed.is_none() {
        return Err(bad(
            n,
            &token(11, "auto"),
            "the choice must be a concrete algorithm",
        ));
    }
    if request != Algorithm::Auto && algorithm != request {
        return Err(bad(
            n,
            &token(11, algorithm.name()),
            "the choice differs from the explicit request",
        ));
    }
    let threads = one(12)?;
    if threads > cap {
        return Err(bad(n, &token(12, get(12)?), "threads above cap"));
    }
    let run_isa = match values[13] {
        None => isa,
        Some(v) => isa_at(13, v)?,
    };
    if run_isa > isa {
        return Err(bad(
            n,
            &token(13, run_isa.name()),
            "run_isa above isa (a plan runs the request's path or one below it)",
        ));
    }
    let key = Key {
        isa,
        cap,
        request,
        input: [input[0], input[1], input[2], input[3]],
        out: one(4)?,
        kernel: pair(5)?,
        stride: pair(6)?,
        pad: [pad[0], pad[1], pad[2], pad[3]],
        dilation: pair(8)?,
        groups: one(9)?,
        mode,
        transposed,
    };
    Ok((
        key,
        Choice {
            algorithm,
            threads,
            run_isa,
        },
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "isa=avx2 cap=2 request=auto input=1x64x56x56 out=64 kernel=3x3 \
                        stride=1x1 pad=1,1,1,1 dilation=1x1 groups=1 mode=xcorr \
                        algorithm=direct-dense threads=1";

    #[test]
    fn an_entry_round_trips() {
        let (k, c) = parse_entry(2, LINE).unwrap();
        assert_eq!(
            entry_line(&k, &c),
            LINE.split_whitespace().collect::<Vec<_>>().join(" ")
        );
        assert_eq!(c.algorithm, Algorithm::DirectDense);
        assert_eq!(k.pad, [1, 1, 1, 1]);
        // Without `run_isa`, the plan runs the key's path.
        assert_eq!(c.run_isa, Isa::Avx2);
    }

    #[test]
    fn run_isa_round_trips_where_it_differs() {
        let line = format!("{LINE} run_isa=portable");
        let (k, c) = parse_entry(2, &line).unwrap();
        assert_eq!((k.isa, c.run_isa), (Isa::Avx2, Isa::Portable));
        assert_eq!(
            entry_line(&k, &c),
            line.split_whitespace().collect::<Vec<_>>().join(" ")
        );
        // Written where it differs only: the same path reads back without it.
        let (k, c) = parse_entry(2, &format!("{LINE} run_isa=avx2")).unwrap();
        assert_eq!(c.run_isa, Isa::Avx2);
        assert!(!entry_line(&k, &c).contains("run_isa"));
    }

    const TRANSPOSED: &str = "isa=avx2 cap=2 request=auto input=8x256x8x8 out=128 kernel=4x4 \
                              stride=2x2 op=transpose offset=1,-2 output=16x15 dilation=1x1 \
                              groups=1 mode=xcorr algorithm=auto threads=2";

    #[test]
    fn a_transposed_entry_round_trips() {
        let (k, c) = parse_entry(3, TRANSPOSED).unwrap();
        assert_eq!(
            entry_line(&k, &c),
            TRANSPOSED.split_whitespace().collect::<Vec<_>>().join(" ")
        );
        // Its choice may be the sub-pixel phases, each with its own Auto.
        assert_eq!(c.algorithm, Algorithm::Auto);
        assert_eq!(
            k.transposed,
            Some(TransposedLayer {
                offset: [1, -2],
                output: [16, 15],
            })
        );
        // Not the key of a convolution with the same numbers.
        let plain = LINE.replace("input=1x64x56x56 out=64", "input=8x256x8x8 out=128");
        let (p, _) = parse_entry(3, &plain).unwrap();
        assert_ne!(p, k);
    }

    #[test]
    fn a_transposed_entry_has_offset_and_output_not_pad() {
        let cases = [
            ("op=transpose", "op=flip", "op=flip"),
            ("offset=1,-2", "offset=1", "offset=1"),
            ("offset=1,-2", "offset=1,x", "offset=1,x"),
            ("offset=1,-2", "", "offset"),
            ("output=16x15", "output=16x0", "output=16x0"),
            ("output=16x15", "", "output"),
            ("threads=2", "threads=2 pad=0,0,0,0", "pad"),
        ];
        for (from, to, token) in cases {
            let line = TRANSPOSED.replace(from, to);
            match parse_entry(4, &line) {
                Err(ConvError::InvalidWisdom {
                    line: 4, token: t, ..
                }) => assert_eq!(t, token, "{to}"),
                other => panic!("{to}: {other:?}"),
            }
        }
        // A convolution's entry has neither, nor an `auto` choice.
        for (extra, token) in [("offset=1,1", "offset"), ("output=4x4", "output")] {
            match parse_entry(5, &format!("{LINE} {extra}")) {
                Err(ConvError::InvalidWisdom { token: t, .. }) => assert_eq!(t, token),
                other => panic!("{extra}: {other:?}"),
            }
        }
    }

    #[test]
    fn each_fault_names_its_token() {
        let cases = [
            ("cap=2", "cap=0", "cap=0"),
            ("cap=2", "cap=two", "cap=two"),
            ("algorithm=direct-dense", "algorithm=fft", "algorithm=fft"),
            ("algorithm=direct-dense", "algorithm=auto", "algorithm=auto"),
            ("isa=avx2", "isa=neon", "isa=neon"),
            ("mode=xcorr", "mode=flip", "mode=flip"),
            ("pad=1,1,1,1", "pad=1,1", "pad=1,1"),
            ("input=1x64x56x56", "input=1x64x56", "input=1x64x56"),
            ("threads=1", "threads=3", "threads=3"),
            ("groups=1", "groups=1 groups=1", "groups=1"),
            ("groups=1", "groups", "groups"),
            ("groups=1", "", "groups"),
            ("groups=1", "colour=red", "colour=red"),
            ("request=auto", "request=implicit", "algorithm=direct-dense"),
            ("threads=1", "threads=1 run_isa=neon", "run_isa=neon"),
            ("threads=1", "threads=1 run_isa=AVX2", "run_isa=AVX2"),
            ("threads=1", "threads=1 run_isa=", "run_isa="),
            ("threads=1", "threads=1 run_isa=avx512", "run_isa=avx512"),
            (
                "threads=1",
                "threads=1 run_isa=avx2 run_isa=avx2",
                "run_isa=avx2",
            ),
        ];
        for (from, to, token) in cases {
            let line = LINE.replace(from, to);
            match parse_entry(7, &line) {
                Err(ConvError::InvalidWisdom {
                    line: 7, token: t, ..
                }) => {
                    assert_eq!(t, token, "{to}")
                }
                other => panic!("{to}: {other:?}"),
            }
        }
    }
}
