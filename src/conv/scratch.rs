//! Per-call buffers that come from, and go back to, a small pool kept by
//! each thread.
//!
//! A buffer asked of the allocator afresh at every call comes back as new
//! pages, each faulted in and zeroed by the kernel at its first touch: on
//! the virtual machines this crate is measured on, 184 µs for the 590 KB of
//! r50_3x3_s2's transposed weights, an eighth of the whole grad input. The
//! pool hands a call the buffers its thread's earlier calls used, already
//! mapped. It holds at most [`KEPT`] buffers per thread, the largest ones,
//! so its memory is bounded by the largest calls a thread has made.

use crate::error::ConvError;
use std::cell::RefCell;
use std::ops::{Deref, DerefMut};

/// Floats in a 64-byte cache line (one zmm register): the slack a buffer
/// keeps in front of a part that must start on a line.
pub(crate) const LINE_FLOATS: usize = 64 / std::mem::size_of::<f32>();

/// Floats from the start of `v` to its first 64-byte boundary (below
/// [`LINE_FLOATS`] for any `f32` slice): where a part of a plain `Vec` or
/// [`Scratch`] that the kernels load as whole lines starts, so that no
/// vector load of it splits across two lines.
pub(crate) fn line_offset(v: &[f32]) -> usize {
    v.as_ptr().align_offset(64).min(LINE_FLOATS)
}

/// Buffers each thread keeps between calls. An input gradient through the
/// sub-pixel phases holds six at once (the weights by tap, the phases'
/// gathered weights and planes, and up to three dense tiles' packed
/// weights); with four kept, the two it asked for afresh were faulted in
/// again at every call.
const KEPT: usize = 8;

thread_local! {
    static POOL: RefCell<Vec<Vec<f32>>> = const { RefCell::new(Vec::new()) };
}

/// `len` zeros, in a buffer from this thread's pool (grown, fallibly, if
/// none is large enough), which goes back to the pool when dropped.
#[derive(Debug)]
pub(crate) struct Scratch {
    data: Vec<f32>,
}

impl Scratch {
    /// `len` zeros; `what` names the buffer in [`ConvError::OutOfMemory`].
    pub(crate) fn zeroed(what: &'static str, len: usize) -> Result<Scratch, ConvError> {
        let mut s = Scratch::any(what, len)?;
        s.fill(0.0);
        Ok(s)
    }

    /// `len` floats left from the buffer's last use (zeros where it never
    /// held that many): for a buffer the caller overwrites whole, which
    /// would only pay for zeroing it.
    pub(crate) fn any(what: &'static str, len: usize) -> Result<Scratch, ConvError> {
        let mut data = POOL.with(|pool| {
            let mut pool = pool.borrow_mut();
            // The smallest buffer that fits, else the largest (to grow).
            let fits = (0..pool.len())
                .filter(|&i| pool[i].capacity() >= len)
                .min_by_key(|&i| pool[i].capacity());
            let pick = fits.or_else(|| (0..pool.len()).max_by_key(|&i| pool[i].capacity()));
            pick.map(|i| pool.swap_remove(i)).unwrap_or_default()
        });
        if data.capacity() < len {
            data = super::try_with_capacity(what, len)?;
        }
        data.resize(len, 0.0);
        data.truncate(len);
        Ok(Scratch { data })
    }
}

impl Deref for Scratch {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        &self.data
    }
}

impl DerefMut for Scratch {
    fn deref_mut(&mut self) -> &mut [f32] {
        &mut self.data
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let data = std::mem::take(&mut self.data);
        if data.capacity() == 0 {
            return;
        }
        // A thread being torn down has no pool left: the buffer is freed.
        let _ = POOL.try_with(|pool| {
            let mut pool = pool.borrow_mut();
            pool.push(data);
            if pool.len() > KEPT {
                let smallest = (0..pool.len())
                    .min_by_key(|&i| pool[i].capacity())
                    .expect("more than KEPT buffers");
                pool.swap_remove(smallest);
            }
        });
    }
}

/// Floats owned for as long as their holder lives (a plan's packed weights)
/// or, for the length of one call, a [`Scratch`] from the thread's pool.
#[derive(Debug)]
pub(crate) enum Buffer {
    Owned(Vec<f32>),
    Pooled(Scratch),
}

impl Default for Buffer {
    fn default() -> Buffer {
        Buffer::Owned(Vec::new())
    }
}

impl Clone for Buffer {
    /// A copy owned by the clone: the pool's buffer stays with one holder.
    fn clone(&self) -> Buffer {
        Buffer::Owned(self.to_vec())
    }
}

impl Deref for Buffer {
    type Target = [f32];
    fn deref(&self) -> &[f32] {
        match self {
            Buffer::Owned(v) => v,
            Buffer::Pooled(s) => s,
        }
    }
}

impl DerefMut for Buffer {
    fn deref_mut(&mut self) -> &mut [f32] {
        match self {
            Buffer::Owned(v) => v,
            Buffer::Pooled(s) => s,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn buffers_are_zeroed_and_reused() {
        let first = {
            let mut a = Scratch::zeroed("test", 1000).unwrap();
            assert!(a.iter().all(|&v| v == 0.0));
            a.fill(7.0);
            a.as_ptr()
        };
        let b = Scratch::zeroed("test", 500).unwrap();
        assert_eq!(b.len(), 500);
        assert!(
            b.iter().all(|&v| v == 0.0),
            "a reused buffer comes back zeroed"
        );
        assert_eq!(b.as_ptr(), first, "the thread's buffer is reused");
        // A second buffer alive at the same time is another one.
        let c = Scratch::zeroed("test", 10).unwrap();
        assert_ne!(c.as_ptr(), b.as_ptr());
    }

    #[test]
    fn six_buffers_held_at_once_all_go_back_to_the_pool() {
        // The phases' input gradient holds six at once (see KEPT); a test
        // runs on its own thread, whose pool starts empty.
        let held: Vec<Scratch> = (1..=6)
            .map(|i| Scratch::any("test", 1000 * i).unwrap())
            .collect();
        drop(held);
        POOL.with(|pool| assert_eq!(pool.borrow().len(), 6));
    }

    #[test]
    fn the_pool_keeps_a_bounded_number_of_buffers() {
        let held: Vec<Scratch> = (1..=KEPT + 3)
            .map(|i| Scratch::zeroed("test", 100 * i).unwrap())
            .collect();
        drop(held);
        POOL.with(|pool| assert!(pool.borrow().len() <= KEPT));
    }
}
