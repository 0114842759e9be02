//! Callers taking turns for the workers (`queue.fair_share`): start-time fair queueing over
//! the callers of one server.
//!
//! Why: priorities order the queue, and within a priority arrival order alone lets a caller
//! that queued 60 jobs hold every worker until they all ran; another caller's one study waits
//! behind all 60. Counting each caller's *running* jobs does not help where it matters most:
//! with one worker (a CPU server) nobody has anything running when the worker asks for its
//! next job, so every caller ties and arrival order wins again. What a caller has been given
//! must be remembered across jobs.
//!
//! So each queued job gets a *start tag* when it is queued: the later of the queue's clock
//! (the start tag of the job a worker took last) and the end of its caller's previous job
//! (that job's start tag plus its work over the caller's weight). Workers take the lowest
//! tag first within a priority, the earlier arrival on a tie. A caller with a backlog has its
//! jobs spread out ahead of the clock, one per unit of work; a caller that had nothing queued
//! starts at the clock and is next. Its idle time earns it nothing (no burst later at the
//! others' expense), and a caller alone uses every worker. The tags are set once, so the
//! queue's order, and each job's place in it, changes only when jobs arrive or leave.
//!
//! A job's work is its steps times its grid's pixels, in default fits (50 steps at 256²), so
//! a caller of small quick jobs gets as many more of them as they are smaller.

use std::collections::HashMap;
use std::sync::Arc;

/// The work of one default fit (50 steps on a 256² grid), the unit of the tags.
const DEFAULT_FIT: f64 = 50.0 * 256.0 * 256.0;

/// The turns' bookkeeping: the queue's clock and where each caller's queued work ends.
#[derive(Debug, Default)]
pub struct Turns {
    clock: f64,
    ends: HashMap<Arc<str>, f64>,
}

impl Turns {
    /// The start and end tags of a job `caller` queues now: `iterations` steps on a `size`²
    /// grid, the caller's `weight` (0 reads as 1). Workers take the lowest start first.
    pub fn tag(&mut self, caller: &Arc<str>, iterations: usize, size: i64, weight: u32) -> (f64, f64) {
        let work = (iterations.max(1) as f64 * (size.max(1) as f64).powi(2) / DEFAULT_FIT).max(1e-6);
        let start = self.clock.max(self.ends.get(caller).copied().unwrap_or(0.0));
        let end = start + work / f64::from(weight.max(1));
        self.ends.insert(caller.clone(), end);
        (start, end)
    }

    /// A worker took a job of start tag `start`: the clock moves up to it.
    pub fn taken(&mut self, start: f64) {
        self.clock = self.clock.max(start);
    }

    /// A queued job of `caller` with these tags left the queue without running (cancelled):
    /// when it was the caller's last, its next job starts where this one would have. Why: a
    /// caller whose backlog was cancelled is not held back by work nobody did. (One
    /// cancelled from the middle of its backlog leaves a gap, closed as the clock passes it.)
    pub fn withdrawn(&mut self, caller: &Arc<str>, (start, end): (f64, f64)) {
        if let Some(e) = self.ends.get_mut(caller) {
            if *e == end {
                *e = start;
            }
        }
    }

    /// Nothing is queued or running: every caller starts afresh, the tags' numbers kept small.
    pub fn idle(&mut self) {
        self.clock = 0.0;
        self.ends.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn name(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[test]
    fn a_backlog_is_spread_out_and_a_newcomer_starts_at_the_clock() {
        let mut t = Turns::default();
        let (bulk, clinic) = (name("bulk"), name("clinic"));
        let tags: Vec<(f64, f64)> = (0..4).map(|_| t.tag(&bulk, 50, 256, 1)).collect();
        assert_eq!(tags, vec![(0.0, 1.0), (1.0, 2.0), (2.0, 3.0), (3.0, 4.0)]);
        t.taken(0.0);
        t.taken(1.0);
        assert_eq!(t.tag(&clinic, 50, 256, 1), (1.0, 2.0), "at the clock: next after the job taken last");
        assert_eq!(t.tag(&clinic, 50, 256, 1), (2.0, 3.0), "its second after its first");
        let last = t.tag(&bulk, 50, 256, 1);
        assert_eq!(last, (4.0, 5.0));
        // Smaller jobs are less work; a weight divides the work.
        let small = name("small");
        assert_eq!((t.tag(&small, 5, 128, 1).0, t.tag(&small, 5, 128, 1).0), (1.0, 1.025));
        let heavy = name("heavy");
        assert_eq!((t.tag(&heavy, 50, 256, 4).0, t.tag(&heavy, 50, 256, 0).0), (1.0, 1.25));
        t.taken(0.5);
        assert_eq!(t.clock, 1.0, "the clock never goes back (a priority took an older tag)");
        // Its last queued job cancelled, bulk's next one takes its place; not so one before it.
        t.withdrawn(&bulk, tags[3]);
        t.withdrawn(&bulk, last);
        assert_eq!(t.tag(&bulk, 50, 256, 1).0, 4.0);
        t.idle();
        assert_eq!(t.tag(&bulk, 50, 256, 1).0, 0.0, "an idle server starts everyone afresh");
    }
}
