//! An in-process group: N ranks as threads of one process, collectives through shared
//! memory. The tests' data-parallel CPU runs use it (N ranks must give, step by step, the
//! parameters of one process averaging the N ranks' gradients itself).
//!
//! Each collective is a round: every rank deposits its values; the last to arrive combines
//! them (sum in rank order, or the root's copy), publishes the result and wakes the others.
//! A rank whose handle is dropped while the group is still in use (its thread failed or
//! returned early) marks the group broken: ranks waiting or arriving later fail with a
//! message naming it. A round not complete within the timeout fails with the ranks missing.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};

use super::Communicator;

struct State {
    /// Completed rounds.
    round: u64,
    /// Values deposited in the current round, per rank.
    deposits: Vec<Option<Vec<f32>>>,
    /// What the last completed round produced.
    result: Arc<Vec<f32>>,
    /// The first rank that left, and in which round.
    left: Option<(usize, u64)>,
}

struct Shared {
    world: usize,
    timeout: Duration,
    state: Mutex<State>,
    wake: Condvar,
}

/// Makes the ranks' communicators.
pub struct LocalGroup;

impl LocalGroup {
    /// `world` communicators, rank i at index i, each to be moved to its own thread.
    pub fn ranks(world: usize, timeout: Duration) -> Vec<LocalComm> {
        assert!(world > 0, "a group needs a rank");
        let shared = Arc::new(Shared {
            world,
            timeout,
            state: Mutex::new(State {
                round: 0,
                deposits: vec![None; world],
                result: Arc::new(Vec::new()),
                left: None,
            }),
            wake: Condvar::new(),
        });
        (0..world).map(|rank| LocalComm { rank, shared: shared.clone(), rounds: 0 }).collect()
    }
}

/// One rank of a `LocalGroup`.
pub struct LocalComm {
    rank: usize,
    shared: Arc<Shared>,
    /// Rounds this rank took part in.
    rounds: u64,
}

enum Combine {
    Sum,
    From(usize),
}

impl LocalComm {
    fn round(&mut self, what: &str, buf: &mut [f32], combine: Combine) -> Result<()> {
        let sh = &*self.shared;
        let me = self.rank;
        let mut st = sh.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((r, k)) = st.left {
            bail!(
                "rank {me}: rank {r} of {} stopped (failed or returned) in round {}, before this {what} (round {}); stopping",
                sh.world,
                k + 1,
                self.rounds + 1
            );
        }
        st.deposits[me] = Some(buf.to_vec());
        let target = st.round + 1;
        if st.deposits.iter().all(Option::is_some) {
            let parts: Vec<Vec<f32>> = st.deposits.iter_mut().map(|d| d.take().expect("all deposited")).collect();
            if parts.iter().any(|p| p.len() != buf.len()) {
                let lens: Vec<usize> = parts.iter().map(Vec::len).collect();
                st.left = Some((me, st.round));
                sh.wake.notify_all();
                bail!("rank {me}: the ranks' {what} sizes differ ({lens:?}): the ranks are not running the same model");
            }
            st.result = Arc::new(match combine {
                Combine::Sum => super::sum_in_rank_order(parts.iter().map(Vec::as_slice), buf.len()),
                Combine::From(root) => parts[root].clone(),
            });
            st.round = target;
            sh.wake.notify_all();
        } else {
            let deadline = Instant::now() + sh.timeout;
            while st.round < target {
                if let Some((r, k)) = st.left {
                    bail!(
                        "rank {me}: rank {r} of {} stopped (failed or returned) in round {} while this rank waited in a {what} (round {target}); stopping",
                        sh.world,
                        k + 1
                    );
                }
                let now = Instant::now();
                if now >= deadline {
                    let missing: Vec<usize> =
                        st.deposits.iter().enumerate().filter(|(_, d)| d.is_none()).map(|(i, _)| i).collect();
                    st.deposits[me] = None;
                    bail!(
                        "rank {me}: {what} (round {target}) timed out after {:.0} s waiting for rank(s) {missing:?} (VOX2VEC_DIST_TIMEOUT sets the limit)",
                        sh.timeout.as_secs_f64()
                    );
                }
                st = sh.wake.wait_timeout(st, deadline - now).unwrap_or_else(|p| p.into_inner()).0;
            }
        }
        buf.copy_from_slice(&st.result);
        self.rounds += 1;
        Ok(())
    }
}

impl Communicator for LocalComm {
    fn rank(&self) -> usize {
        self.rank
    }
    fn world(&self) -> usize {
        self.shared.world
    }
    fn all_reduce_sum(&mut self, buf: &mut [f32]) -> Result<()> {
        self.round("all-reduce", buf, Combine::Sum)
    }
    fn broadcast(&mut self, buf: &mut [f32], root: usize) -> Result<()> {
        anyhow::ensure!(root < self.shared.world, "broadcast from rank {root} of {}", self.shared.world);
        self.round("broadcast", buf, Combine::From(root))
    }
    fn name(&self) -> &'static str {
        "in-process"
    }
}

impl Drop for LocalComm {
    /// A rank that leaves breaks the group: a round it has not joined can no longer complete,
    /// so ranks waiting in one, or starting one later, fail with its name instead of waiting.
    /// Ranks that finished together never start another round, so a normal end is unaffected.
    fn drop(&mut self) {
        let mut st = self.shared.state.lock().unwrap_or_else(|p| p.into_inner());
        if st.left.is_none() {
            st.left = Some((self.rank, self.rounds));
        }
        self.shared.wake.notify_all();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_in_rank_order_and_broadcasts() {
        let comms = LocalGroup::ranks(3, Duration::from_secs(10));
        let out: Vec<(Vec<f32>, Vec<f32>)> = std::thread::scope(|s| {
            let hs: Vec<_> = comms
                .into_iter()
                .map(|mut c| {
                    s.spawn(move || {
                        let r = c.rank() as f32;
                        let mut a = vec![r, 10.0 * r];
                        c.all_reduce_sum(&mut a).unwrap();
                        let mut b = vec![r; 2];
                        c.broadcast(&mut b, 2).unwrap();
                        (a, b)
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (a, b) in out {
            assert_eq!(a, vec![3.0, 30.0]);
            assert_eq!(b, vec![2.0, 2.0]);
        }
    }

    #[test]
    fn a_rank_that_stops_fails_the_others_and_a_missing_rank_times_out() {
        let mut comms = LocalGroup::ranks(2, Duration::from_secs(30));
        let c1 = comms.pop().unwrap();
        let mut c0 = comms.pop().unwrap();
        let t = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(100));
            drop(c1); // rank 1 fails before its first all-reduce
        });
        let t0 = Instant::now();
        let err = c0.all_reduce_sum(&mut [1.0]).unwrap_err().to_string();
        t.join().unwrap();
        assert!(err.contains("rank 1 of 2 stopped"), "{err}");
        assert!(t0.elapsed() < Duration::from_secs(10), "waited {:?}", t0.elapsed());

        let mut comms = LocalGroup::ranks(2, Duration::from_millis(200));
        let err = comms[0].all_reduce_sum(&mut [1.0]).unwrap_err().to_string();
        assert!(err.contains("timed out") && err.contains("[1]"), "{err}");
    }
}
