//! L2 and the paper's mini-batch-aware regularisation.

use crate::model::{Din, EmbeddingGrads, Module, Role};
use crate::schema::{RegularizationConfig, RegularizationKind};

/// Adds the regulariser's gradient to the model's dense gradients and to
/// `emb` (rows touched by the batch), and returns the penalty's value.
///
/// * `L2`: `λ_dnn Σ ||W||²` over MLP weight matrices plus `λ Σ_j ||w_j||²`
///   over the embedding rows of the batch (`λ_dnn` = `dnn_lambda`, else `λ`).
/// * `MiniBatchAware` (DIN paper, eq. 4): `Σ_j λ / n_j ||w_j||²` over the
///   embedding rows j of the batch, `n_j` = the id's count in the training
///   data (`counts[table][id]`, at least 1), plus `λ_dnn Σ ||W||²` when
///   `dnn_lambda` is set. Only rows in the batch are touched, so the cost is
///   proportional to the batch, not the vocabulary.
pub fn regularize(
    config: &RegularizationConfig,
    model: &mut Din,
    emb: &mut EmbeddingGrads,
    counts: &[Vec<u32>],
) -> f64 {
    let lambda = config.lambda;
    let dnn_lambda = match config.kind {
        RegularizationKind::None => return 0.0,
        RegularizationKind::L2 => config.dnn_lambda.unwrap_or(lambda),
        RegularizationKind::MiniBatchAware => config.dnn_lambda.unwrap_or(0.0),
    };
    let mut penalty = 0.0f64;
    if dnn_lambda != 0.0 {
        model.visit_mut("", &mut |_, p| {
            if p.role == Role::Weight {
                for (g, w) in p.grad.iter_mut().zip(&p.value) {
                    *g += 2.0 * dnn_lambda * w;
                    penalty += f64::from(dnn_lambda * w * w);
                }
            }
        });
    }
    if lambda == 0.0 {
        return penalty;
    }
    for (t, (table, g)) in model.embeddings.iter().zip(emb.iter_mut()).enumerate() {
        let d = g.dim;
        for (k, &id) in g.ids.iter().enumerate() {
            let scale = match config.kind {
                RegularizationKind::MiniBatchAware => {
                    let n = counts
                        .get(t)
                        .and_then(|c| c.get(id as usize))
                        .copied()
                        .unwrap_or(1)
                        .max(1);
                    lambda / n as f32
                }
                _ => lambda,
            };
            for (g, &w) in g.grads[k * d..(k + 1) * d].iter_mut().zip(table.row(id)) {
                *g += 2.0 * scale * w;
                penalty += f64::from(scale * w * w);
            }
        }
    }
    penalty
}
