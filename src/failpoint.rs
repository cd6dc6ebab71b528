//! Crash points for tests: with the `failpoints` feature, the step named in
//! `JOBCACHEFS_CRASH_AT` kills the process on the spot, as a power cut or OOM kill would.
//! Release builds compile every call to nothing.

/// Kills this process with SIGKILL if `JOBCACHEFS_CRASH_AT` names `step` (test builds only).
#[inline]
pub fn hit(step: &str) {
    #[cfg(feature = "failpoints")]
    if std::env::var("JOBCACHEFS_CRASH_AT").is_ok_and(|want| want == step) {
        // SIGKILL skips destructors and buffered output, so nothing tidies up after the crash.
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = step;
}
