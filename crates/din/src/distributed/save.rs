//! A sharded model leaves the ranks as one model directory without any
//! rank holding it whole: rank 0 writes `model.safetensors` as the tables'
//! rows arrive from their owners, a piece at a time. [`gather_model`]
//! assembles the whole model on rank 0 instead, for tests and small models.

use std::path::Path;

use super::collective::Collective;
use super::shard::Owners;
use crate::checkpoint::{save_streamed, Assets, EpochReport, TensorStream};
use crate::model::{Din, Embedding, Module, Param, Role};
use crate::schema::{Config, Layout};
use crate::{Error, Result};

/// Floats of a table each rank sends rank 0 in one all-to-all of a save,
/// at most: rank 0 holds `ranks` times this (1 MiB a rank) of a table at a
/// time, whatever the table's size.
const SAVE_PIECE: usize = 1 << 18;

/// Floats of a table each rank sends in one all-to-all of
/// [`gather_model`], at most (an MPI count is a C `int`).
const GATHER_PIECE: usize = 1 << 26;

/// What rank 0 writes besides the weights.
#[derive(Debug, Clone, Copy)]
pub struct SaveTo<'a> {
    /// The model directory.
    pub dir: &'a Path,
    /// The resolved config (vocabulary sizes frozen).
    pub config: &'a Config,
    /// Vocabulary and item table.
    pub assets: &'a Assets,
    /// The epochs so far, for `history.json`.
    pub history: &'a [EpochReport],
}

/// Saves the sharded model as one model directory, every rank taking part:
/// rank 0 passes `Some(to)` and writes the directory as
/// [`save_with_assets`](crate::checkpoint::save_with_assets) writes the
/// whole model (the same bytes), the dense layers from its replica and
/// each table's rows streamed from their owners in pieces; the other ranks
/// pass `None` and send their rows.
///
/// Whatever fails on rank 0 (a folder that is not a model directory, a
/// full disk), every rank still takes part in every exchange, and every
/// rank returns the error.
pub fn save_sharded(
    to: Option<SaveTo<'_>>,
    model: &Din,
    layout: &Layout,
    owners: Owners,
    comm: &mut dyn Collective,
) -> Result<()> {
    save_in_pieces(to, model, layout, owners, comm, SAVE_PIECE)
}

/// [`save_sharded`] moving at most `piece` floats per rank at a time.
fn save_in_pieces(
    to: Option<SaveTo<'_>>,
    model: &Din,
    layout: &Layout,
    owners: Owners,
    comm: &mut dyn Collective,
    piece: usize,
) -> Result<()> {
    let mut stream = ShardStream {
        model,
        layout,
        owners,
        comm,
        piece,
        streamed: vec![false; layout.tables.len()],
        buffers: Buffers::default(),
    };
    let result = match to {
        Some(to) => save_streamed(to.dir, to.config, &mut stream, to.assets, Some(to.history)),
        None => Ok(()),
    };
    // The tables rank 0 did not reach (on the other ranks: all of them),
    // in the order rank 0 streams them.
    let failure = stream.finish().err();
    let result = result.and(failure.map_or(Ok(()), Err));
    let mut flags = Vec::new();
    comm.all_gather_u64(&[u64::from(result.is_err())], &mut flags)?;
    match (result, flags.iter().position(|&f| f != 0)) {
        (Err(e), _) => Err(e),
        (Ok(()), Some(r)) => Err(Error::Distributed(format!(
            "rank {r} could not save the model (its error says why)"
        ))),
        (Ok(()), None) => Ok(()),
    }
}

/// Gathers the sharded model whole on rank 0 (`Some` there, `None` on the
/// other ranks): the dense layers from rank 0's replica, each table's rows
/// from their owners.
pub fn gather_model(model: &Din, layout: &Layout, owners: Owners, comm: &mut dyn Collective) -> Result<Option<Din>> {
    gather_in_pieces(model, layout, owners, comm, GATHER_PIECE)
}

/// [`gather_model`] moving at most `piece` floats per rank at a time.
fn gather_in_pieces(
    model: &Din,
    layout: &Layout,
    owners: Owners,
    comm: &mut dyn Collective,
    piece: usize,
) -> Result<Option<Din>> {
    let root = owners.rank == 0;
    let mut whole = root.then(|| Din {
        layout: layout.clone(),
        embeddings: (layout.tables.iter())
            .map(|t| Embedding {
                weight: Param::new(vec![0.0; t.rows() * t.dim], vec![t.rows(), t.dim], Role::Embedding),
            })
            .collect(),
        attention: model.attention.clone(),
        dnn: model.dnn.clone(),
        output: model.output.clone(),
        dnn_bf16: Default::default(),
    });
    let mut buffers = Buffers::default();
    for t in 0..layout.tables.len() {
        let mut at = 0;
        stream_table(model, layout, owners, comm, t, piece, &mut buffers, &mut |rows| {
            if let Some(w) = whole.as_mut() {
                w.embeddings[t].weight.value[at..at + rows.len()].copy_from_slice(rows);
                at += rows.len();
            }
            Ok(())
        })?;
    }
    Ok(whole)
}

/// The sharded model as a [`TensorStream`]: the dense tensors from this
/// rank's replica, the tables from every rank (each table streamed once,
/// by [`ShardStream::write`] or, for those not reached, by
/// [`ShardStream::finish`], so the ranks always exchange the same pieces).
struct ShardStream<'a> {
    model: &'a Din,
    layout: &'a Layout,
    owners: Owners,
    comm: &'a mut dyn Collective,
    /// Floats per rank and round, at most.
    piece: usize,
    /// Whether each table has been streamed.
    streamed: Vec<bool>,
    buffers: Buffers,
}

/// The tensor name of table `t`, as [`Din`]'s `visit` names it.
fn table_tensor(layout: &Layout, t: usize) -> String {
    format!("embeddings.{}.weight", layout.tables[t].name)
}

impl ShardStream<'_> {
    /// Streams table `t`, handing rank 0's `sink` its rows in id order.
    /// After `sink` fails, the table is still streamed to the end (the
    /// other ranks send every piece); the first error is returned.
    fn table(&mut self, t: usize, sink: &mut dyn FnMut(&[f32]) -> Result<()>) -> Result<()> {
        self.streamed[t] = true;
        let mut failed = None;
        stream_table(
            self.model,
            self.layout,
            self.owners,
            self.comm,
            t,
            self.piece,
            &mut self.buffers,
            &mut |rows| {
                if failed.is_none() {
                    failed = sink(rows).err();
                }
                Ok(())
            },
        )?;
        failed.map_or(Ok(()), Err)
    }

    /// Streams (and drops) the tables not streamed yet, in name order.
    fn finish(&mut self) -> Result<()> {
        let mut left: Vec<usize> = (0..self.layout.tables.len()).filter(|&t| !self.streamed[t]).collect();
        left.sort_by_key(|&t| table_tensor(self.layout, t));
        for t in left {
            self.table(t, &mut |_| Ok(()))?;
        }
        Ok(())
    }
}

impl TensorStream for ShardStream<'_> {
    fn tensors(&self) -> Vec<(String, Vec<usize>)> {
        let mut out = Vec::new();
        let mut k = 0;
        self.model.visit("", &mut |name, p| {
            // The tables come first, whole.
            let shape = match self.layout.tables.get(k) {
                Some(t) => vec![t.rows(), t.dim],
                None => p.shape.clone(),
            };
            k += 1;
            out.push((name, shape));
        });
        out
    }

    fn write(&mut self, name: &str, sink: &mut dyn FnMut(&[f32]) -> Result<()>) -> Result<()> {
        if let Some(t) = (0..self.layout.tables.len()).find(|&t| table_tensor(self.layout, t) == name) {
            return self.table(t, sink);
        }
        let mut result = Err(Error::Distributed(format!("the model has no tensor `{name}`")));
        self.model.visit("", &mut |n, p| {
            if n == name {
                result = sink(&p.value);
            }
        });
        result
    }
}

/// Reused buffers of [`stream_table`].
#[derive(Debug, Default)]
struct Buffers {
    counts: Vec<usize>,
    recv: Vec<f32>,
    recv_counts: Vec<usize>,
    rows: Vec<f32>,
}

/// Streams table `t` of the sharded model to rank 0 in pieces of at most
/// `piece` floats per rank: each round, every rank sends rank 0 its next
/// local rows, which are rows `from * ranks ..` of the whole table,
/// interleaved by owner; rank 0 hands them to `each` in id order (so
/// `each` sees the whole table, row-major, once). The other ranks only
/// send; `each` is not called there.
#[allow(clippy::too_many_arguments)]
fn stream_table(
    model: &Din,
    layout: &Layout,
    owners: Owners,
    comm: &mut dyn Collective,
    t: usize,
    piece: usize,
    b: &mut Buffers,
    each: &mut dyn FnMut(&[f32]) -> Result<()>,
) -> Result<()> {
    let n = owners.ranks;
    let table = &layout.tables[t];
    let (rows, dim) = (table.rows(), table.dim.max(1));
    let mine = &model.embeddings[t].weight.value;
    let owned = owners.owned_by(owners.rank, rows);
    if mine.len() != owned * table.dim {
        return Err(Error::Distributed(format!(
            "rank {} holds {} values of table `{}`, its {owned} rows need {}",
            owners.rank,
            mine.len(),
            table.name,
            owned * table.dim
        )));
    }
    // Rank 0 owns the most rows; every rank takes part in its rounds.
    let most = owners.owned_by(0, rows);
    let chunk = (piece / dim).max(1);
    b.counts.clear();
    b.counts.resize(n, 0);
    for from in (0..most.max(1)).step_by(chunk) {
        let (lo, hi) = (from.min(owned), (from + chunk).min(owned));
        b.counts[0] = (hi - lo) * table.dim;
        comm.all_to_all_f32(
            &mine[lo * table.dim..hi * table.dim],
            &b.counts,
            &mut b.recv,
            &mut b.recv_counts,
        )?;
        if owners.rank != 0 || table.dim == 0 {
            continue;
        }
        // Local row `from + k` of rank `r` is row `(from + k) * n + r`:
        // by k, then by rank, the rows come in id order.
        let have: Vec<usize> = b.recv_counts.iter().map(|c| c / dim).collect();
        let starts: Vec<usize> = (have.iter())
            .scan(0, |at, &h| {
                let s = *at;
                *at += h * dim;
                Some(s)
            })
            .collect();
        b.rows.clear();
        for k in 0..have.first().copied().unwrap_or(0) {
            for r in 0..n {
                if k < have[r] {
                    b.rows
                        .extend_from_slice(&b.recv[starts[r] + k * dim..starts[r] + (k + 1) * dim]);
                }
            }
        }
        each(&b.rows)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::fs;

    use super::*;
    use crate::checkpoint::{load_model, save_with_assets, WEIGHTS_FILE};
    use crate::distributed::in_process;

    /// The tutorial's schema (tables of 4 to 209 rows) with a small model.
    fn tutorial() -> (Config, Layout) {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../configs/movie_sample.toml");
        let mut config = Config::from_toml_file(&path).expect("config");
        config.model.attention.hidden_units = vec![16];
        config.model.dnn.hidden_units = vec![8];
        let layout = config.validate().expect("valid");
        (config, layout)
    }

    /// On each of `ranks` ranks (threads): `f(rank's shard, owners, comm)`.
    fn on_ranks<T: Send>(
        ranks: usize,
        layout: &Layout,
        config: &Config,
        f: impl Fn(&Din, Owners, &mut dyn Collective) -> T + Sync,
    ) -> Vec<T> {
        std::thread::scope(|s| {
            let handles: Vec<_> = (in_process(ranks).into_iter().enumerate())
                .map(|(rank, mut comm)| {
                    let f = &f;
                    s.spawn(move || {
                        let shard = Din::new_shard(layout, &config.model, 7, rank, ranks).expect("shard");
                        f(&shard, Owners { rank, ranks }, &mut comm)
                    })
                })
                .collect();
            handles.into_iter().map(|h| h.join().expect("rank")).collect()
        })
    }

    /// The ranks' shards of `Din::new`'s model, gathered or saved in
    /// pieces of any size (one row a round, some rows, whole tables), are
    /// that model: the rows come back in id order from uneven shards (209
    /// rows over 2 and 3 ranks), and the saved file is byte for byte the
    /// one the whole model saves to.
    #[test]
    fn gathered_and_saved_shards_are_the_whole_model() {
        let (config, layout) = tutorial();
        let assets = Assets::default();
        let whole = Din::new(&layout, &config.model, 7).expect("model");
        let tmp = tempfile::tempdir().expect("tmp");
        let reference = tmp.path().join("whole");
        save_with_assets(&reference, &config, &whole, &Assets::default(), Some(&[])).expect("save");
        let expected = fs::read(reference.join(WEIGHTS_FILE)).expect("read");
        for ranks in [1, 2, 3] {
            for piece in [1, 20, SAVE_PIECE] {
                let dir = tmp.path().join(format!("m{ranks}-{piece}"));
                let got = on_ranks(ranks, &layout, &config, |shard, owners, comm| {
                    let gathered = gather_in_pieces(shard, &layout, owners, comm, piece)?;
                    let to = (owners.rank == 0).then_some(SaveTo {
                        dir: &dir,
                        config: &config,
                        assets: &assets,
                        history: &[],
                    });
                    save_in_pieces(to, shard, &layout, owners, comm, piece)?;
                    Ok::<_, Error>(gathered)
                });
                let mut got = got.into_iter().map(|r| r.expect("every rank"));
                assert!(
                    got.next().flatten() == Some(whole.clone()),
                    "{ranks} ranks, pieces of {piece}: gathered"
                );
                assert!(got.all(|g| g.is_none()), "only rank 0 gathers");
                let bytes = fs::read(dir.join(WEIGHTS_FILE)).expect("saved");
                assert!(bytes == expected, "{ranks} ranks, pieces of {piece}: the file differs");
                assert!(load_model(&dir).expect("loads").model == whole);
            }
        }
    }

    /// A save that fails on rank 0 (its folder holds another file) fails on
    /// every rank, without a hang, and leaves the folder as it was.
    #[test]
    fn a_save_rank_0_cannot_write_fails_on_every_rank() {
        let (config, layout) = tutorial();
        let assets = Assets::default();
        let tmp = tempfile::tempdir().expect("tmp");
        let dir = tmp.path().join("runs");
        fs::create_dir_all(&dir).expect("mkdir");
        fs::write(dir.join("notes.txt"), "mine").expect("write");
        let got = on_ranks(3, &layout, &config, |shard, owners, comm| {
            let to = (owners.rank == 0).then_some(SaveTo {
                dir: &dir,
                config: &config,
                assets: &assets,
                history: &[],
            });
            save_in_pieces(to, shard, &layout, owners, comm, 20).map_err(|e| e.to_string())
        });
        let errors: Vec<String> = got.into_iter().map(|r| r.expect_err("fails")).collect();
        assert!(errors[0].contains("not a model file"), "{errors:?}");
        assert!(
            errors[1..].iter().all(|e| e.contains("rank 0 could not save")),
            "{errors:?}"
        );
        assert_eq!(fs::read_to_string(dir.join("notes.txt")).expect("kept"), "mine");
        assert!(!dir.join(WEIGHTS_FILE).exists());
    }
}
