//! The collectives distributed training runs on, as a small trait: the
//! library stays free of MPI; `din train --distributed` implements it over
//! MPI, tests over threads of one process ([`in_process`]).

use std::sync::{Arc, Condvar, Mutex, MutexGuard};

use crate::{Error, Result};

/// The collective operations of data-parallel training. Every rank calls
/// the same operations in the same order; an operation returns once every
/// rank has taken part (or with an error when one cannot).
///
/// Buffers hold one part per rank, in rank order (`counts[r]` values for,
/// or from, rank `r`; a rank's part for itself included).
pub trait Collective {
    /// This process's rank, `0..ranks()`.
    fn rank(&self) -> usize;
    /// How many ranks take part.
    fn ranks(&self) -> usize;
    /// All-to-all with varying counts: `send` holds `counts[r]` values for
    /// each rank `r`; `recv` receives what each rank sent to this one, in
    /// rank order, `recv_counts[r]` of them from rank `r`.
    fn all_to_all_u32(
        &mut self,
        send: &[u32],
        counts: &[usize],
        recv: &mut Vec<u32>,
        recv_counts: &mut Vec<usize>,
    ) -> Result<()>;
    /// [`Collective::all_to_all_u32`] of `f32` values.
    fn all_to_all_f32(
        &mut self,
        send: &[f32],
        counts: &[usize],
        recv: &mut Vec<f32>,
        recv_counts: &mut Vec<usize>,
    ) -> Result<()>;
    /// All-gather with varying counts, known to every rank: this rank sends
    /// `send` (`counts[rank]` values); `recv` receives every rank's, in rank
    /// order.
    fn all_gather_f32(&mut self, send: &[f32], counts: &[usize], recv: &mut Vec<f32>) -> Result<()>;
    /// Every rank's `send` (the same length on every rank), concatenated
    /// in rank order into `recv`.
    fn all_gather_u64(&mut self, send: &[u64], recv: &mut Vec<u64>) -> Result<()>;
}

/// Where segment `r` of `len` values starts when they are split into
/// `ranks` nearly equal segments (`r` = `ranks`: `len`).
pub fn segment_start(len: usize, ranks: usize, r: usize) -> usize {
    // u128: no overflow for any length.
    (len as u128 * r as u128 / ranks.max(1) as u128) as usize
}

/// Buffers of [`all_reduce_sum`], reused from call to call.
#[derive(Debug, Clone, Default)]
pub struct ReduceBuffers {
    counts: Vec<usize>,
    parts: Vec<f32>,
    part_counts: Vec<usize>,
    sum: Vec<f32>,
}

/// Sums `values` element-wise over every rank, in a fixed order: rank `s`
/// sums segment `s` of the vector (a reduce-scatter, the ranks' values of
/// each element added in rank order 0, 1, ...), then every rank gathers
/// every segment. Every rank ends with bitwise the same sums, and the same
/// inputs give the same sums run after run, whatever the transport. Each
/// rank sends `2 (N-1)/N` times the vector (as a ring all-reduce does).
pub fn all_reduce_sum(comm: &mut dyn Collective, values: &mut [f32], buffers: &mut ReduceBuffers) -> Result<()> {
    let (n, me, len) = (comm.ranks(), comm.rank(), values.len());
    if n <= 1 {
        return Ok(());
    }
    let b = buffers;
    b.counts.clear();
    b.counts
        .extend((0..n).map(|r| segment_start(len, n, r + 1) - segment_start(len, n, r)));
    comm.all_to_all_f32(values, &b.counts, &mut b.parts, &mut b.part_counts)?;
    let mine = b.counts[me];
    if b.part_counts.iter().any(|&c| c != mine) || b.parts.len() != mine * n {
        return Err(Error::Distributed(format!(
            "all-reduce of {len} values: the ranks sent segments of {:?} values, expected {mine} each (the ranks' models differ)",
            b.part_counts
        )));
    }
    b.sum.clear();
    b.sum.extend_from_slice(&b.parts[..mine]);
    for part in b.parts.chunks_exact(mine.max(1)).skip(1).take(n - 1) {
        b.sum.iter_mut().zip(part).for_each(|(s, v)| *s += v);
    }
    let mut gathered = std::mem::take(&mut b.parts);
    comm.all_gather_f32(&b.sum, &b.counts, &mut gathered)?;
    if gathered.len() != len {
        return Err(Error::Distributed(format!(
            "all-reduce of {len} values gathered {}",
            gathered.len()
        )));
    }
    values.copy_from_slice(&gathered);
    b.parts = gathered;
    Ok(())
}

/// One process, rank 0 of 1: every operation hands the values back.
#[derive(Debug, Clone, Copy, Default)]
pub struct Solo;

impl Collective for Solo {
    fn rank(&self) -> usize {
        0
    }
    fn ranks(&self) -> usize {
        1
    }
    fn all_to_all_u32(
        &mut self,
        send: &[u32],
        _: &[usize],
        recv: &mut Vec<u32>,
        counts: &mut Vec<usize>,
    ) -> Result<()> {
        solo_copy(send, recv, counts)
    }
    fn all_to_all_f32(
        &mut self,
        send: &[f32],
        _: &[usize],
        recv: &mut Vec<f32>,
        counts: &mut Vec<usize>,
    ) -> Result<()> {
        solo_copy(send, recv, counts)
    }
    fn all_gather_f32(&mut self, send: &[f32], _: &[usize], recv: &mut Vec<f32>) -> Result<()> {
        solo_copy(send, recv, &mut Vec::new())
    }
    fn all_gather_u64(&mut self, send: &[u64], recv: &mut Vec<u64>) -> Result<()> {
        solo_copy(send, recv, &mut Vec::new())
    }
}

/// `send` into `recv`, its length into `counts`.
fn solo_copy<T: Copy>(send: &[T], recv: &mut Vec<T>, counts: &mut Vec<usize>) -> Result<()> {
    recv.clear();
    recv.extend_from_slice(send);
    counts.clear();
    counts.push(send.len());
    Ok(())
}

/// `ranks` ranks in one process, one per thread: each element drives one
/// rank (move it into its thread). For tests of distributed training
/// without MPI. A rank that is dropped (its training stopped, e.g. with
/// an error) makes the others' next operation an error instead of a
/// deadlock.
pub fn in_process(ranks: usize) -> Vec<InProcess> {
    let shared = Arc::new(Shared {
        ranks,
        state: Mutex::new(State {
            slots: (0..ranks * ranks).map(|_| None).collect(),
            arrived: 0,
            generation: 0,
            departed: None,
        }),
        turn: Condvar::new(),
    });
    (0..ranks)
        .map(|rank| InProcess {
            shared: shared.clone(),
            rank,
        })
        .collect()
}

/// One rank of [`in_process`].
#[derive(Debug)]
pub struct InProcess {
    shared: Arc<Shared>,
    rank: usize,
}

#[derive(Debug)]
struct Shared {
    ranks: usize,
    state: Mutex<State>,
    turn: Condvar,
}

/// What one rank hands another in an operation.
#[derive(Debug)]
enum Payload {
    U32(Vec<u32>),
    F32(Vec<f32>),
    U64(Vec<u64>),
}

#[derive(Debug)]
struct State {
    /// `slots[from * ranks + to]`: what `from` sends `to` in the current operation.
    slots: Vec<Option<Payload>>,
    /// Ranks waiting at the barrier.
    arrived: usize,
    /// Barriers passed.
    generation: u64,
    /// The first rank that left.
    departed: Option<usize>,
}

impl InProcess {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.shared.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Waits until every rank has arrived.
    fn barrier(&self) -> Result<()> {
        let mut st = self.lock();
        let gone = |r: usize| Error::Distributed(format!("rank {r} stopped before this operation"));
        if let Some(r) = st.departed {
            return Err(gone(r));
        }
        let generation = st.generation;
        st.arrived += 1;
        if st.arrived == self.shared.ranks {
            st.arrived = 0;
            st.generation += 1;
            self.shared.turn.notify_all();
            return Ok(());
        }
        while st.generation == generation {
            if let Some(r) = st.departed {
                return Err(gone(r));
            }
            st = self.shared.turn.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        Ok(())
    }

    /// Hands `parts[r]` to each rank `r` and returns what each rank handed this one.
    fn exchange(&self, parts: Vec<Payload>) -> Result<Vec<Payload>> {
        let n = self.shared.ranks;
        {
            let mut st = self.lock();
            for (to, p) in parts.into_iter().enumerate() {
                st.slots[self.rank * n + to] = Some(p);
            }
        }
        self.barrier()?;
        let got = {
            let mut st = self.lock();
            (0..n)
                .map(|from| st.slots[from * n + self.rank].take())
                .collect::<Option<Vec<_>>>()
        };
        // Nobody writes the next operation's slots before all have read these.
        self.barrier()?;
        got.ok_or_else(|| Error::Distributed("a rank sent nothing".into()))
    }

    /// All-to-all of `T` through [`InProcess::exchange`].
    fn all_to_all<T: Copy>(
        &self,
        send: &[T],
        counts: &[usize],
        wrap: fn(Vec<T>) -> Payload,
        unwrap: fn(Payload) -> Option<Vec<T>>,
        recv: &mut Vec<T>,
        recv_counts: &mut Vec<usize>,
    ) -> Result<()> {
        check_counts(send.len(), counts, self.shared.ranks)?;
        let mut at = 0;
        let parts = counts
            .iter()
            .map(|&c| {
                at += c;
                wrap(send[at - c..at].to_vec())
            })
            .collect();
        recv.clear();
        recv_counts.clear();
        for p in self.exchange(parts)? {
            let v = unwrap(p).ok_or_else(|| Error::Distributed("ranks disagree on an operation's type".into()))?;
            recv_counts.push(v.len());
            recv.extend_from_slice(&v);
        }
        Ok(())
    }
}

/// `counts` must have one entry per rank and add up to `len`.
pub fn check_counts(len: usize, counts: &[usize], ranks: usize) -> Result<()> {
    if counts.len() != ranks || counts.iter().sum::<usize>() != len {
        return Err(Error::Distributed(format!(
            "{len} values split as {counts:?} over {ranks} ranks"
        )));
    }
    Ok(())
}

impl Drop for InProcess {
    fn drop(&mut self) {
        let mut st = self.lock();
        st.departed.get_or_insert(self.rank);
        self.shared.turn.notify_all();
    }
}

impl Collective for InProcess {
    fn rank(&self) -> usize {
        self.rank
    }
    fn ranks(&self) -> usize {
        self.shared.ranks
    }
    fn all_to_all_u32(
        &mut self,
        send: &[u32],
        counts: &[usize],
        recv: &mut Vec<u32>,
        recv_counts: &mut Vec<usize>,
    ) -> Result<()> {
        let unwrap = |p| match p {
            Payload::U32(v) => Some(v),
            _ => None,
        };
        self.all_to_all(send, counts, Payload::U32, unwrap, recv, recv_counts)
    }
    fn all_to_all_f32(
        &mut self,
        send: &[f32],
        counts: &[usize],
        recv: &mut Vec<f32>,
        recv_counts: &mut Vec<usize>,
    ) -> Result<()> {
        self.all_to_all(send, counts, Payload::F32, unwrap_f32, recv, recv_counts)
    }
    fn all_gather_f32(&mut self, send: &[f32], counts: &[usize], recv: &mut Vec<f32>) -> Result<()> {
        let n = self.shared.ranks;
        if counts.len() != n || counts[self.rank] != send.len() {
            return Err(Error::Distributed(format!(
                "all-gather: rank {} sends {} values, the counts say {counts:?}",
                self.rank,
                send.len()
            )));
        }
        let parts = (0..n).map(|_| Payload::F32(send.to_vec())).collect();
        recv.clear();
        for (from, p) in self.exchange(parts)?.into_iter().enumerate() {
            let v = unwrap_f32(p).ok_or_else(|| Error::Distributed("ranks disagree on an operation's type".into()))?;
            if v.len() != counts[from] {
                return Err(Error::Distributed(format!(
                    "all-gather: rank {from} sent {} values, the counts say {}",
                    v.len(),
                    counts[from]
                )));
            }
            recv.extend_from_slice(&v);
        }
        Ok(())
    }
    fn all_gather_u64(&mut self, send: &[u64], recv: &mut Vec<u64>) -> Result<()> {
        let n = self.shared.ranks;
        let parts = (0..n).map(|_| Payload::U64(send.to_vec())).collect();
        recv.clear();
        for p in self.exchange(parts)? {
            match p {
                Payload::U64(v) if v.len() == send.len() => recv.extend_from_slice(&v),
                _ => return Err(Error::Distributed("ranks disagree on an all-gather".into())),
            }
        }
        Ok(())
    }
}

fn unwrap_f32(p: Payload) -> Option<Vec<f32>> {
    match p {
        Payload::F32(v) => Some(v),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Runs `f` on every rank of an in-process group, returning each rank's result.
    fn on_ranks<T: Send>(n: usize, f: impl Fn(&mut InProcess) -> T + Sync) -> Vec<T> {
        std::thread::scope(|s| {
            let handles: Vec<_> = in_process(n)
                .into_iter()
                .map(|mut c| {
                    let f = &f;
                    s.spawn(move || f(&mut c))
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("rank thread")).collect()
        })
    }

    #[test]
    fn all_to_all_delivers_each_part_to_its_rank_in_rank_order() {
        // Rank r sends r*10 + to, (to + 1) times, to each rank `to`.
        let got = on_ranks(3, |c| {
            let r = c.rank() as u32;
            let counts = [1, 2, 3];
            let send: Vec<u32> = (0..3u32)
                .flat_map(|to| std::iter::repeat_n(r * 10 + to, to as usize + 1))
                .collect();
            let (mut recv, mut rc) = (Vec::new(), Vec::new());
            c.all_to_all_u32(&send, &counts, &mut recv, &mut rc)
                .expect("all-to-all");
            (recv, rc)
        });
        assert_eq!(got[0], (vec![0, 10, 20], vec![1, 1, 1]));
        assert_eq!(got[2], (vec![2, 2, 2, 12, 12, 12, 22, 22, 22], vec![3, 3, 3]));
    }

    #[test]
    fn all_reduce_sums_in_rank_order_and_every_rank_gets_the_same_bits() {
        // Values whose sum depends on the order: 1e8 + 1 - 1e8 is 0 in f32
        // (left to right), 1 in another order.
        let inputs = [
            vec![1e8f32, 0.5, 3.0, 7.0, 1.0],
            vec![1.0, 0.25, 4.0, 8.0, 2.0],
            vec![-1e8, 0.25, 5.0, 9.0, 3.0],
        ];
        let got = on_ranks(3, |c| {
            let mut v = inputs[c.rank()].clone();
            all_reduce_sum(c, &mut v, &mut ReduceBuffers::default()).expect("all-reduce");
            v
        });
        let expected: Vec<f32> = (0..5).map(|j| inputs[0][j] + inputs[1][j] + inputs[2][j]).collect();
        assert_eq!(expected[0], 0.0, "left to right in f32");
        for v in &got {
            assert_eq!(
                v.iter().map(|x| x.to_bits()).collect::<Vec<_>>(),
                expected.iter().map(|x| x.to_bits()).collect::<Vec<_>>()
            );
        }
    }

    #[test]
    fn a_rank_that_stops_makes_the_others_fail_instead_of_hang() {
        let got = on_ranks(3, |c| {
            if c.rank() == 1 {
                return Err(Error::Distributed("stopped".into()));
            }
            let mut recv = Vec::new();
            c.all_gather_u64(&[1], &mut recv)?;
            c.all_gather_u64(&[2], &mut recv)
        });
        // Rank 1's InProcess is dropped when its closure returns.
        assert!(got.iter().all(|r| r.is_err()), "{got:?}");
    }

    #[test]
    fn solo_hands_the_values_back() {
        let mut v = vec![1.0f32, 2.0];
        all_reduce_sum(&mut Solo, &mut v, &mut ReduceBuffers::default()).expect("solo");
        assert_eq!(v, [1.0, 2.0]);
        let (mut recv, mut counts) = (Vec::new(), Vec::new());
        Solo.all_to_all_u32(&[3, 4], &[2], &mut recv, &mut counts)
            .expect("solo");
        assert_eq!((recv, counts), (vec![3, 4], vec![2]));
    }
}
