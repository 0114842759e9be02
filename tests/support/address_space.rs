//! A real out-of-memory for tests: this process's address space capped (RLIMIT_AS), large
//! allocations sent through mmap so that the address space tracks the live tensors. Shared by
//! `crates/model/tests/batch_oom.rs` and `crates/server/tests/out_of_memory.rs` (included with
//! `#[path]`); each is its own test binary, as the cap holds for the whole process.
#![allow(dead_code)]

/// Allocations of 256 KB and more get their own mmap, given back on free (glibc otherwise
/// raises that threshold as it sees large frees, and serves them from its heaps). And no new
/// malloc arenas: glibc answers a failed allocation by moving the thread to another arena,
/// made on the spot with a 64 MB reservation that stays. Under the cap that took the room a
/// smaller stack needed: measured in `crates/server/tests/out_of_memory.rs`, the idle address
/// space grew by 64–67 MB steps, and after a failed stack the stack of two and the jobs alone
/// failed too, in 9 runs of 10.
pub fn mmap_large_allocations() {
    // SAFETY: allocator parameters only; idempotent.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 << 10);
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
}

/// A field of /proc/self/status in bytes (VmSize: address space now; VmPeak: its maximum).
pub fn vm(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    let line = status.lines().find(|l| l.starts_with(field)).unwrap();
    line.split_whitespace().nth(1).unwrap().parse::<u64>().unwrap() * 1024
}

/// Caps this process's address space at `cap` bytes (None: lifts the cap). While capped, a
/// panic reports nothing: libtorch's out-of-memory reaches Rust as a tch panic that the fit
/// catches, and the default hook would format its message and capture a backtrace with no
/// memory left (and, failing, wait forever on the backtrace lock it holds).
pub fn cap_address_space(cap: Option<u64>) {
    match cap {
        Some(bytes) => {
            std::panic::set_hook(Box::new(|_| {}));
            set_soft_limit(bytes as libc::rlim_t);
        }
        None => {
            set_soft_limit(libc::RLIM_INFINITY);
            drop(std::panic::take_hook());
        }
    }
}

fn set_soft_limit(bytes: libc::rlim_t) {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: plain syscalls on a local struct.
    unsafe {
        assert_eq!(libc::getrlimit(libc::RLIMIT_AS, &mut lim), 0);
        lim.rlim_cur = bytes.min(lim.rlim_max);
        assert_eq!(libc::setrlimit(libc::RLIMIT_AS, &lim), 0);
    }
}
