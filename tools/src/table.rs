//! Markdown tables printed one row at a time, so long runs show results as
//! they come; columns are padded to a fixed width (wider cells still make a
//! valid table).

/// Column alignment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Align {
    /// Text.
    Left,
    /// Numbers.
    Right,
}

/// A column: header, width, alignment.
#[derive(Clone, Copy, Debug)]
pub struct Column {
    /// Header text.
    pub header: &'static str,
    /// Padded width.
    pub width: usize,
    /// Alignment of the cells.
    pub align: Align,
}

/// A left-aligned column at least `width` wide.
pub const fn left(header: &'static str, width: usize) -> Column {
    Column {
        header,
        width,
        align: Align::Left,
    }
}

/// A right-aligned column at least `width` wide.
pub const fn right(header: &'static str, width: usize) -> Column {
    Column {
        header,
        width,
        align: Align::Right,
    }
}

/// A table's layout.
pub struct Table {
    columns: Vec<Column>,
}

impl Table {
    /// A table of these columns; widths grow to fit the headers.
    pub fn new(columns: &[Column]) -> Self {
        Table {
            columns: columns
                .iter()
                .map(|c| Column {
                    width: c.width.max(c.header.chars().count()),
                    ..*c
                })
                .collect(),
        }
    }

    /// The header line and the separator line (with alignment colons).
    pub fn header(&self) -> String {
        let names: Vec<String> = self.columns.iter().map(|c| c.header.to_string()).collect();
        let seps: Vec<String> = self
            .columns
            .iter()
            .map(|c| match c.align {
                Align::Left => format!(":{}", "-".repeat(c.width - 1)),
                Align::Right => format!("{}:", "-".repeat(c.width - 1)),
            })
            .collect();
        format!("{}\n{}", self.row(&names), self.line(&seps))
    }

    /// One body row; `cells` must have one entry per column.
    pub fn row(&self, cells: &[String]) -> String {
        let padded: Vec<String> = self
            .columns
            .iter()
            .zip(cells)
            .map(|(c, s)| match c.align {
                Align::Left => format!("{s:<w$}", w = c.width),
                Align::Right => format!("{s:>w$}", w = c.width),
            })
            .collect();
        self.line(&padded)
    }

    fn line(&self, cells: &[String]) -> String {
        format!("| {} |", cells.join(" | "))
    }
}

/// Formats a number with about four significant digits.
pub fn sig(x: f64) -> String {
    if !x.is_finite() {
        return format!("{x}");
    }
    let a = x.abs();
    if a >= 1000.0 {
        format!("{x:.0}")
    } else if a >= 100.0 {
        format!("{x:.1}")
    } else if a >= 10.0 {
        format!("{x:.2}")
    } else if a >= 0.01 || a == 0.0 {
        format!("{x:.3}")
    } else {
        format!("{x:.2e}")
    }
}
