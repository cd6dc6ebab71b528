//! Crash points for tests: with the `failpoints` feature, the step named in
//! `JOBCACHEFS_CRASH_AT` kills the process on the spot, as an OOM kill would, and the step
//! named in `JOBCACHEFS_SHUTDOWN_AT` first cuts off the filesystem holding
//! `JOBCACHEFS_SHUTDOWN_PATH` (as a power cut would: whatever was not yet durable never
//! reaches the disk), then kills the process.
//! Release builds compile every call to nothing.

/// Kills this process with SIGKILL if `JOBCACHEFS_CRASH_AT` names `step`; if
/// `JOBCACHEFS_SHUTDOWN_AT` names it, shuts down the filesystem of `JOBCACHEFS_SHUTDOWN_PATH`
/// first (test builds only).
#[inline]
pub fn hit(step: &str) {
    #[cfg(feature = "failpoints")]
    {
        if std::env::var("JOBCACHEFS_SHUTDOWN_AT").is_ok_and(|want| want == step) {
            shutdown::cut_off_filesystem(step);
            kill();
        }
        if std::env::var("JOBCACHEFS_CRASH_AT").is_ok_and(|want| want == step) {
            kill();
        }
    }
    #[cfg(not(feature = "failpoints"))]
    let _ = step;
}

#[cfg(feature = "failpoints")]
fn kill() {
    // SIGKILL skips destructors and buffered output, so nothing tidies up after the crash.
    let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
}

#[cfg(feature = "failpoints")]
mod shutdown {
    use std::os::fd::AsRawFd;

    /// `FS_GOING_FLAGS_NOLOGFLUSH`: stop at once, without writing the journal or the log out,
    /// so only what an fsync or syncfs already made durable is on the disk.
    const NOLOGFLUSH: u32 = 0x2;

    /// `FS_IOC_SHUTDOWN` = `_IOR('X', 125, __u32)`; libc does not define it. The direction
    /// field starts at bit 29 on the architectures with three direction bits, 30 elsewhere.
    const FS_IOC_SHUTDOWN: u64 = {
        const DIR_SHIFT: u32 = if cfg!(any(
            target_arch = "powerpc",
            target_arch = "powerpc64",
            target_arch = "mips",
            target_arch = "mips64",
            target_arch = "sparc",
            target_arch = "sparc64"
        )) {
            29
        } else {
            30
        };
        const READ: u64 = 2;
        (READ << DIR_SHIFT) | ((std::mem::size_of::<u32>() as u64) << 16) | ((b'X' as u64) << 8) | 125
    };

    /// Shuts down the filesystem holding `JOBCACHEFS_SHUTDOWN_PATH`. A shutdown that cannot
    /// happen aborts (SIGABRT, not SIGKILL), so a test never mistakes it for a cut.
    pub(super) fn cut_off_filesystem(step: &str) {
        let Some(path) = std::env::var_os("JOBCACHEFS_SHUTDOWN_PATH") else {
            eprintln!("failpoint {step}: JOBCACHEFS_SHUTDOWN_AT needs JOBCACHEFS_SHUTDOWN_PATH");
            std::process::abort();
        };
        let file = match std::fs::File::open(&path) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("failpoint {step}: open {}: {e}", std::path::Path::new(&path).display());
                std::process::abort();
            }
        };
        let mut flags: u32 = NOLOGFLUSH;
        // SAFETY: the fd is open for the call, and the kernel reads one u32 through the pointer,
        // which points at a live local.
        let rc = unsafe { libc::ioctl(file.as_raw_fd(), FS_IOC_SHUTDOWN as _, &mut flags as *mut u32) };
        if rc != 0 {
            let e = std::io::Error::last_os_error();
            eprintln!("failpoint {step}: FS_IOC_SHUTDOWN on {}: {e}", std::path::Path::new(&path).display());
            std::process::abort();
        }
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn the_request_code_is_the_kernels() {
            #[cfg(any(target_arch = "x86_64", target_arch = "aarch64"))]
            assert_eq!(super::FS_IOC_SHUTDOWN, 0x8004_587d);
        }
    }
}
