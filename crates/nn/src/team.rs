//! A team of threads that run one step together, phase by phase, with spinning barriers: the
//! execution model of llama.cpp's CPU backend, for work whose phases last microseconds.
//!
//! Why not rayon: a one-token decode step of a small model is about 200 phases of 5-50 us each
//! (a projection, the attention heads, the next projection). A rayon parallel region started
//! from outside the pool hands its job to the pool and parks the caller; the pool's threads fall
//! asleep between regions, so each region pays a wake-up and a hand-back, about as long as the
//! work itself on two cores (measured: the second thread added 10% to decode). Here every member
//! runs the whole step: work that is cheaper than a hand-off (a norm over 576 floats, quantizing
//! one activation row) is simply done by every member on its own copy, and only the large
//! products are split, in chunks taken from a shared counter, with a spin barrier after each.
//!
//! Results do not depend on the team's size: a chunk's output is computed the same way by
//! whichever member takes it.

use std::cell::UnsafeCell;
use std::ops::Range;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

/// Spins before yielding the core while waiting at a barrier: long enough to cover a phase of a
/// decode step, short enough that a member whose core was taken by another process soon lets it
/// run.
const SPINS_BEFORE_YIELD: u32 = 1 << 14;

/// What every member of a team shares.
struct Shared {
    size: usize,
    arrived: AtomicUsize,
    generation: AtomicUsize,
    /// The next unclaimed chunk of the current [`Member::split`].
    next: AtomicUsize,
    /// Set when a member panicked, so the others stop waiting for it.
    poisoned: AtomicBool,
}

/// One member's handle inside [`run`].
pub struct Member<'a> {
    id: usize,
    shared: &'a Shared,
}

impl Member<'_> {
    /// This member's index, `0..size`; member 0 runs on the calling thread.
    pub fn id(&self) -> usize {
        self.id
    }

    /// Members in the team.
    pub fn size(&self) -> usize {
        self.shared.size
    }

    /// Waits until every member arrived here. What a member wrote before its barrier is visible
    /// to every member after it.
    pub fn barrier(&self) {
        let s = self.shared;
        if s.size == 1 {
            s.next.store(0, Ordering::Relaxed);
            return;
        }
        let generation = s.generation.load(Ordering::Acquire);
        if s.arrived.fetch_add(1, Ordering::AcqRel) + 1 == s.size {
            // The last to arrive resets the barrier and the chunk counter (nobody is using
            // either now) and releases the others.
            s.arrived.store(0, Ordering::Relaxed);
            s.next.store(0, Ordering::Relaxed);
            s.generation
                .store(generation.wrapping_add(1), Ordering::Release);
            return;
        }
        let mut spins = 0u32;
        while s.generation.load(Ordering::Acquire) == generation {
            if s.poisoned.load(Ordering::Relaxed) {
                panic!("a member of the thread team panicked");
            }
            if spins < SPINS_BEFORE_YIELD {
                spins += 1;
                std::hint::spin_loop();
            } else {
                std::thread::yield_now();
            }
        }
    }

    /// Splits `0..total` into chunks of `chunk` (the last may be shorter) that the members take
    /// in turn until none is left, calls `f` on each with its range and the matching part of
    /// `out` (whose length must be `total * width` for some width: chunk `r` gets
    /// `out[r.start * width..r.end * width]`), then waits at a barrier. Every member must call
    /// it, in the same order relative to its other calls.
    pub fn split<T: Send>(
        &self,
        out: &SharedBuf<T>,
        total: usize,
        chunk: usize,
        mut f: impl FnMut(Range<usize>, &mut [T]),
    ) {
        let chunk = chunk.max(1);
        let chunks = total.div_ceil(chunk);
        let width = out.len.checked_div(total).unwrap_or(0);
        assert_eq!(
            width * total,
            out.len,
            "split: output not a multiple of the rows"
        );
        loop {
            let c = self.shared.next.fetch_add(1, Ordering::Relaxed);
            if c >= chunks {
                break;
            }
            let rows = c * chunk..((c + 1) * chunk).min(total);
            // SAFETY: each chunk index is handed out once (the counter), so the ranges of `out`
            // given out here are disjoint, and no member reads `out` until the barrier below
            // (`SharedBuf::get` is only called outside `split`, see its contract).
            let part = unsafe { out.slice_mut(rows.start * width..rows.end * width) };
            f(rows, part);
        }
        self.barrier();
    }

    /// Runs `f` on member 0 only, then waits at a barrier.
    pub fn single(&self, f: impl FnOnce()) {
        if self.id == 0 {
            f();
        }
        self.barrier();
    }
}

/// A buffer the members write in disjoint chunks through [`Member::split`] and read after it.
pub struct SharedBuf<T> {
    data: Box<[UnsafeCell<T>]>,
    len: usize,
}

// SAFETY: access follows the team's phases (see `split` and `get`): chunks written by one member
// each, reads only after the barrier that ends the writing phase.
unsafe impl<T: Send> Sync for SharedBuf<T> {}

impl<T: Copy + Default> SharedBuf<T> {
    pub fn new(len: usize) -> Self {
        Self {
            data: (0..len).map(|_| UnsafeCell::new(T::default())).collect(),
            len,
        }
    }
}

impl<T> SharedBuf<T> {
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// # Safety
    /// `range` must not overlap a range any other thread is accessing.
    // The cells are `UnsafeCell`s: handing out `&mut` from `&self` is the point of the type.
    #[allow(clippy::mut_from_ref)]
    unsafe fn slice_mut(&self, range: Range<usize>) -> &mut [T] {
        let cells = &self.data[range];
        // SAFETY: `UnsafeCell<T>` has the layout of `T`; exclusivity is the caller's promise.
        unsafe { std::slice::from_raw_parts_mut(UnsafeCell::raw_get(cells.as_ptr()), cells.len()) }
    }

    /// The whole buffer.
    ///
    /// # Safety
    /// No member may be inside a [`Member::split`] writing this buffer while the returned slice
    /// lives: read it between the barrier that ended its writing phase and the next phase that
    /// writes it (each phase ends in a barrier, so a read finished before the caller's next
    /// `split` or `barrier` is always safe).
    pub unsafe fn get(&self) -> &[T] {
        // SAFETY: see the contract above; the layout argument of `slice_mut`.
        unsafe { std::slice::from_raw_parts(UnsafeCell::raw_get(self.data.as_ptr()), self.len) }
    }

    /// The buffer once the team is done (no sharing left).
    pub fn into_vec(self) -> Vec<T> {
        self.data
            .into_vec()
            .into_iter()
            .map(UnsafeCell::into_inner)
            .collect()
    }
}

/// Runs `f` on `size` members at once (member 0 on this thread, the others on scoped threads
/// started for this call) and returns when all finished. A panic in any member reaches the caller.
pub fn run<F>(size: usize, f: F)
where
    F: Fn(&Member) + Sync,
{
    let size = size.max(1);
    let shared = Shared {
        size,
        arrived: AtomicUsize::new(0),
        generation: AtomicUsize::new(0),
        next: AtomicUsize::new(0),
        poisoned: AtomicBool::new(false),
    };
    /// Marks the team poisoned if its member unwinds, so nobody waits for it forever.
    struct Poison<'a>(&'a AtomicBool);
    impl Drop for Poison<'_> {
        fn drop(&mut self) {
            if std::thread::panicking() {
                self.0.store(true, Ordering::Relaxed);
            }
        }
    }
    let body = |id: usize| {
        let _guard = Poison(&shared.poisoned);
        f(&Member {
            id,
            shared: &shared,
        });
    };
    if size == 1 {
        return body(0);
    }
    std::thread::scope(|scope| {
        for id in 1..size {
            let body = &body;
            scope.spawn(move || body(id));
        }
        body(0);
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn split_covers_every_row_once_and_barriers_publish() {
        for size in 1..=4 {
            let total = 1003;
            let out = SharedBuf::<u32>::new(total * 2);
            run(size, |m| {
                for round in 0..5u32 {
                    m.split(&out, total, 7, |rows, part| {
                        for (i, r) in rows.enumerate() {
                            part[2 * i] += r as u32 + round;
                            part[2 * i + 1] += 1;
                        }
                    });
                }
                // SAFETY: read after the last split's barrier; nobody writes `out` again.
                let seen = unsafe { out.get() };
                for r in 0..total {
                    assert_eq!(seen[2 * r], 5 * r as u32 + 10, "member {} row {r}", m.id());
                }
            });
            let out = out.into_vec();
            for r in 0..total {
                assert_eq!(out[2 * r + 1], 5, "row {r} visits, team of {size}");
            }
        }
    }

    #[test]
    fn a_panicking_member_does_not_hang_the_team() {
        let r = std::panic::catch_unwind(|| {
            run(3, |m| {
                if m.id() == 2 {
                    panic!("boom");
                }
                m.barrier();
            })
        });
        assert!(r.is_err());
    }
}
