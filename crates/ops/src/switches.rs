//! The process-wide kernel choices (`csrc/common.h`'s `g_switches`): each op's module has the
//! public getter and setter of its own.

extern "C" {
    fn s3ops_switch(which: i32, set: i32) -> i32;
}

/// The process-wide kernel choices (`csrc/common.h`'s `g_switches`, in its order): each at its default
/// unless its environment variable is "1" (on) or "0" (off), read at first use, or set.
#[derive(Clone, Copy)]
pub(crate) enum Switch {
    PixelLosses = 0,
    DwColumns = 1,
    SplitKKernel = 2,
    FusedEpilogues = 3,
    FusedSgd = 4,
    StemColumns = 5,
}

/// Reads a [`Switch`], setting it first when `set` says so.
pub(crate) fn switch(which: Switch, set: Option<bool>) -> bool {
    // SAFETY: reads (and sets) a process-wide atomic; the index is one of common.h's.
    unsafe { s3ops_switch(which as i32, set.map_or(-1, i32::from)) == 1 }
}
