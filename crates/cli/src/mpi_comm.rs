//! din's collectives ([`din::distributed::Collective`]) over MPI (rsmpi),
//! for `din train --distributed` under `mpirun` (the `mpi` feature).

use din::distributed::{check_counts, Collective};
use mpi::datatype::{Partition, PartitionMut};
use mpi::topology::SimpleCommunicator;
use mpi::traits::{Communicator, CommunicatorCollectives, Equivalence};
use mpi::Count;

/// The MPI world as din's [`Collective`]: every call is one MPI
/// collective (`MPI_Alltoall` of the counts then `MPI_Alltoallv`,
/// `MPI_Allgatherv`, `MPI_Allgather`) on the calling thread.
pub struct MpiCollective {
    world: SimpleCommunicator,
}

impl MpiCollective {
    /// The world communicator of an initialised MPI.
    pub fn new(world: SimpleCommunicator) -> Self {
        MpiCollective { world }
    }

    /// Ends every rank of the job with `code` (MPI_Abort): a rank that
    /// fails must not leave the others waiting in a collective.
    pub fn abort(&self, code: i32) -> ! {
        self.world.abort(code)
    }
}

/// A count as MPI's `int`, or an error for one that does not fit.
fn count(n: usize) -> din::Result<Count> {
    Count::try_from(n).map_err(|_| {
        din::Error::Distributed(format!(
            "a message of {n} values is larger than one MPI operation takes (2^31 - 1)"
        ))
    })
}

/// Counts and their displacements (prefix sums) as MPI `int`s.
fn counts_and_displacements(counts: &[usize]) -> din::Result<(Vec<Count>, Vec<Count>)> {
    let c = counts.iter().map(|&n| count(n)).collect::<din::Result<Vec<_>>>()?;
    let mut at = 0usize;
    let mut d = Vec::with_capacity(counts.len());
    for &n in counts {
        d.push(count(at)?);
        at += n;
    }
    count(at)?;
    Ok((c, d))
}

impl MpiCollective {
    fn all_to_all<T: Equivalence + Copy + Default>(
        &mut self,
        send: &[T],
        counts: &[usize],
        recv: &mut Vec<T>,
        recv_counts: &mut Vec<usize>,
    ) -> din::Result<()> {
        check_counts(send.len(), counts, self.ranks())?;
        let (sc, sd) = counts_and_displacements(counts)?;
        let mut rc: Vec<Count> = vec![0; self.ranks()];
        self.world.all_to_all_into(&sc[..], &mut rc[..]);
        recv_counts.clear();
        recv_counts.extend(rc.iter().map(|&c| c.max(0) as usize));
        let (rc, rd) = counts_and_displacements(recv_counts)?;
        recv.clear();
        recv.resize(recv_counts.iter().sum(), T::default());
        let partition = Partition::new(send, &sc[..], &sd[..]);
        let mut into = PartitionMut::new(&mut recv[..], &rc[..], &rd[..]);
        self.world.all_to_all_varcount_into(&partition, &mut into);
        Ok(())
    }
}

impl Collective for MpiCollective {
    fn rank(&self) -> usize {
        self.world.rank().max(0) as usize
    }

    fn ranks(&self) -> usize {
        self.world.size().max(1) as usize
    }

    fn all_to_all_u32(
        &mut self,
        send: &[u32],
        counts: &[usize],
        recv: &mut Vec<u32>,
        recv_counts: &mut Vec<usize>,
    ) -> din::Result<()> {
        self.all_to_all(send, counts, recv, recv_counts)
    }

    fn all_to_all_f32(
        &mut self,
        send: &[f32],
        counts: &[usize],
        recv: &mut Vec<f32>,
        recv_counts: &mut Vec<usize>,
    ) -> din::Result<()> {
        self.all_to_all(send, counts, recv, recv_counts)
    }

    fn all_gather_f32(&mut self, send: &[f32], counts: &[usize], recv: &mut Vec<f32>) -> din::Result<()> {
        if counts.len() != self.ranks() || counts[self.rank()] != send.len() {
            return Err(din::Error::Distributed(format!(
                "all-gather: rank {} sends {} values, the counts say {counts:?}",
                self.rank(),
                send.len()
            )));
        }
        let (c, d) = counts_and_displacements(counts)?;
        recv.clear();
        recv.resize(counts.iter().sum(), 0.0);
        let mut into = PartitionMut::new(&mut recv[..], &c[..], &d[..]);
        self.world.all_gather_varcount_into(send, &mut into);
        Ok(())
    }

    fn all_gather_u64(&mut self, send: &[u64], recv: &mut Vec<u64>) -> din::Result<()> {
        count(send.len() * self.ranks())?;
        recv.clear();
        recv.resize(send.len() * self.ranks(), 0);
        self.world.all_gather_into(send, &mut recv[..]);
        Ok(())
    }
}
