//! Which worker thread the code runs on: state kept per worker (the backend pools' idle
//! lists) is indexed by it.

use std::cell::Cell;

thread_local! {
    static WORKER: Cell<usize> = const { Cell::new(0) };
}

/// Which worker thread this is; 0 on any other thread (which shares worker 0's slots).
pub fn current() -> usize {
    WORKER.with(Cell::get)
}

/// Marks this thread as worker `i`; called once when the worker starts.
pub fn set_current(i: usize) {
    WORKER.with(|w| w.set(i));
}
