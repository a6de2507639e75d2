//! Stdout that stops quietly when the reader goes away: `cpuconv compare |
//! head -3` is ordinary use, and `println!` panics on the broken pipe.

use std::fmt;
use std::io::{self, Write};

/// Why a subcommand ended early.
#[derive(Debug)]
pub enum Stop {
    /// Stdout was closed: nobody reads the rest, which is not a failure.
    Closed,
    /// A failure, reported on stderr with a non-zero exit status.
    Failed(String),
}

impl From<String> for Stop {
    fn from(message: String) -> Self {
        Stop::Failed(message)
    }
}

/// Writes one line to stdout. Stdout is line-buffered, so a closed pipe is
/// seen at the line that hits it, not at exit.
pub fn line(args: fmt::Arguments) -> Result<(), Stop> {
    let mut out = io::stdout().lock();
    writeln!(out, "{args}").map_err(|e| match e.kind() {
        io::ErrorKind::BrokenPipe => Stop::Closed,
        _ => Stop::Failed(format!("cannot write to stdout: {e}")),
    })
}

/// `println!` that returns a `Result<(), Stop>` instead of panicking.
macro_rules! outln {
    () => {
        $crate::out::line(format_args!(""))
    };
    ($($arg:tt)*) => {
        $crate::out::line(format_args!($($arg)*))
    };
}
pub(crate) use outln;
