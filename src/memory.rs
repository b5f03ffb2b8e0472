//! Giving freed heap memory back to the operating system.
//!
//! glibc keeps what is freed in its per-thread arenas, so after a burst of connections
//! (each with hyper's buffers) is parked, the process would stay as large as at the burst.

/// Returns the allocator's free pages to the system (glibc); elsewhere, nothing.
// One of the crate's three `unsafe` calls (with `notify` and `server::parking`): `libc` would only wrap it.
#[allow(unsafe_code)]
pub fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        unsafe extern "C" {
            fn malloc_trim(pad: usize) -> std::ffi::c_int;
        }
        // SAFETY: malloc_trim takes no pointer from us; it only walks and releases the
        // allocator's own free lists, under the allocator's own locks.
        unsafe {
            malloc_trim(0);
        }
    }
}
