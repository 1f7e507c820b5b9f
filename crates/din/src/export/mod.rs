//! The inference graph as ONNX, for ONNX Runtime, Triton or any other
//! runtime that reads it.
//!
//! [`to_onnx`] writes what [`Din::predict`] computes as an ONNX model
//! (opset [`OPSET`], dynamic batch and history length):
//!
//! * inputs, one per feature, named as in the schema: a sparse feature is
//!   `int64 [batch]` of dense ids; a dense feature `float [batch, dim]`; a
//!   sequence `int64 [batch, len]` of dense ids, padded with 0 (DeepCTR's
//!   form). The DIN histories share the length `history_len` and pad the
//!   same positions; every other sequence has a length of its own
//!   (`<name>_len`);
//! * outputs: `probability`, `float [batch]`, and `attention`,
//!   `float [batch, history_len]`: each behaviour's weight in the pooled
//!   history (0 at padding; the paper's Fig. 5);
//! * the graph: the embedding gathers; the local activation unit over every
//!   position, its first layer split as din computes it
//!   (`q·(Wq+Wd) + k·(Wk-Wd) + (q*k)·Wp`), the padding masked out of the
//!   weights (before the softmax under `normalization = "softmax"`);
//!   attention or sum pooling; the mean of each unpaired sequence; the DNN;
//!   the sigmoid. PReLU is ONNX's `PRelu`; Dice at inference is spelled out
//!   with its moving averages, in din's order of operations.
//!
//! The caller maps raw values to dense ids (the model's `vocab.json`) and
//! truncates each history to its `max_len`, as `din`'s reader does; the
//! graph attends over every non-zero id it is given.
//!
//! The messages are prost types generated from the official `onnx.proto`
//! and checked in (module `pb`), so that no `protoc` is needed to build.

#[allow(clippy::all, clippy::pedantic, missing_docs, rustdoc::all)]
mod pb;

use prost::Message;

use crate::data::Batch;
use crate::model::{Activation, Din, Linear, Mlp};
use crate::schema::{ActivationKind, Normalization, Pooling};
use crate::{Error, Result};

use pb::tensor_proto::DataType;
use pb::tensor_shape_proto::{dimension, Dimension};
use pb::{
    type_proto, AttributeProto, GraphProto, ModelProto, NodeProto, OperatorSetIdProto, StringStringEntryProto,
    TensorProto, TensorShapeProto, TypeProto, ValueInfoProto,
};

/// The ONNX operator set the graph is written for (the default domain).
pub const OPSET: i64 = 13;
/// The ONNX IR version written: 7, the first that opset 13 may use, so
/// that older runtimes read the file.
pub const IR_VERSION: i64 = 7;
/// Name of the probability output, `float [batch]`.
pub const PROBABILITY: &str = "probability";
/// Name of the attention-weight output, `float [batch, history_len]`.
pub const ATTENTION: &str = "attention";
/// Name of the DIN histories' shared dynamic length.
pub const HISTORY_LEN: &str = "history_len";
/// A protobuf message may not exceed 2 GiB; larger models would need ONNX's
/// external data, which this exporter does not write.
const MAX_MESSAGE: usize = (1 << 31) - 1;
/// Added to the scores of padding before a softmax: `exp` of it is exactly 0.
const MASKED_SCORE: f32 = -1e30;

/// One input of the exported graph.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnnxInput {
    /// The feature's name in the schema (and the graph's input name).
    pub name: String,
    /// What it holds.
    pub kind: OnnxInputKind,
}

/// The type and shape of an [`OnnxInput`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OnnxInputKind {
    /// `int64 [batch]`: one dense id per sample.
    Ids,
    /// `float [batch, dim]`.
    Dense(usize),
    /// `int64 [batch, len]`, padded with 0; `len` names the dynamic length.
    Sequence {
        /// The name of the dynamic length (`history_len` for DIN histories).
        len: String,
    },
}

/// The graph's inputs for `model`, in the order [`to_onnx`] declares them:
/// sparse, dense, then sequence features, each in schema order.
pub fn onnx_inputs(model: &Din) -> Vec<OnnxInput> {
    let l = &model.layout;
    let mut inputs: Vec<OnnxInput> = l
        .sparse
        .iter()
        .map(|s| OnnxInput {
            name: s.name.clone(),
            kind: OnnxInputKind::Ids,
        })
        .collect();
    inputs.extend(l.dense.iter().map(|(name, dim)| OnnxInput {
        name: name.clone(),
        kind: OnnxInputKind::Dense(*dim),
    }));
    inputs.extend(l.sequences.iter().enumerate().map(|(i, s)| OnnxInput {
        name: s.name.clone(),
        kind: OnnxInputKind::Sequence {
            len: if l.pairs.iter().any(|&(_, h)| h == i) {
                HISTORY_LEN.to_string()
            } else {
                format!("{}_len", s.name)
            },
        },
    }));
    inputs
}

/// A value for one graph input, built from a [`Batch`] by [`onnx_feeds`].
#[derive(Debug, Clone, PartialEq)]
pub struct OnnxFeed {
    /// The input's name.
    pub name: String,
    /// Its shape: `[batch]`, `[batch, dim]` or `[batch, len]`.
    pub shape: Vec<usize>,
    /// Its values, row-major.
    pub values: FeedValues,
}

/// The values of an [`OnnxFeed`].
#[derive(Debug, Clone, PartialEq)]
pub enum FeedValues {
    /// Dense ids (sparse features, padded sequences).
    Ids(Vec<i64>),
    /// Dense features.
    Floats(Vec<f32>),
}

/// `batch` as the exported graph takes it, one feed per [`onnx_inputs`]
/// entry: each sequence padded with 0 up to its longest history (the DIN
/// histories up to the longest of any of them, since they share
/// `history_len`) plus `extra_padding` positions, and at least 1. A grouped
/// batch is fed sample by sample.
pub fn onnx_feeds(model: &Din, batch: &Batch, extra_padding: usize) -> Vec<OnnxFeed> {
    let l = &model.layout;
    let b = batch.rows;
    let longest = |seqs: &[usize]| {
        seqs.iter()
            .flat_map(|&s| (0..b).map(move |r| batch.history(s, r).len()))
            .max()
            .unwrap_or(0)
    };
    let paired: Vec<usize> = l.pairs.iter().map(|&(_, h)| h).collect();
    let history_len = longest(&paired);
    let mut feeds: Vec<OnnxFeed> = (0..l.sparse.len())
        .map(|f| OnnxFeed {
            name: l.sparse[f].name.clone(),
            shape: vec![b],
            values: FeedValues::Ids((0..b).map(|r| i64::from(batch.sparse_id(f, r))).collect()),
        })
        .collect();
    feeds.extend(l.dense.iter().enumerate().map(|(f, (name, dim))| OnnxFeed {
        name: name.clone(),
        shape: vec![b, *dim],
        values: FeedValues::Floats((0..b).flat_map(|r| batch.dense_values(f, r).iter().copied()).collect()),
    }));
    feeds.extend(l.sequences.iter().enumerate().map(|(s, seq)| {
        let len = if paired.contains(&s) {
            history_len
        } else {
            longest(&[s])
        };
        let t = (len + extra_padding).max(1);
        let mut ids = vec![0i64; b * t];
        for r in 0..b {
            for (slot, &id) in ids[r * t..].iter_mut().zip(batch.history(s, r)) {
                *slot = i64::from(id);
            }
        }
        OnnxFeed {
            name: seq.name.clone(),
            shape: vec![b, t],
            values: FeedValues::Ids(ids),
        }
    }));
    feeds
}

/// `model`'s inference graph as an ONNX file's bytes (see the module docs).
/// `metadata` becomes the model's `metadata_props` (e.g. its version).
/// A model whose weights exceed protobuf's 2 GiB limit is refused.
pub fn to_onnx(model: &Din, metadata: &[(&str, &str)]) -> Result<Vec<u8>> {
    let weights: usize = model.embeddings.iter().map(|e| e.weight.value.len() * 4).sum();
    if weights > MAX_MESSAGE {
        return Err(Error::Export(format!(
            "the embedding tables hold {weights} bytes, more than the 2 GiB an ONNX file can hold without \
             external data (not written by this exporter); lower the vocab_size or embedding_dim"
        )));
    }
    let mut g = Builder::default();
    let inputs = onnx_inputs(model);
    let graph_inputs = inputs.iter().map(input_info).collect();
    let (probability, attention) = g.din(model);
    g.rename(&probability, PROBABILITY);
    g.rename(&attention, ATTENTION);
    let outputs = vec![
        value_info(PROBABILITY, DataType::Float, &[Dim::Batch]),
        value_info(
            ATTENTION,
            DataType::Float,
            &[Dim::Batch, Dim::Named(HISTORY_LEN.into())],
        ),
    ];
    let graph = GraphProto {
        node: g.nodes,
        name: Some("din".into()),
        initializer: g.initializers,
        input: graph_inputs,
        output: outputs,
        doc_string: Some(
            "Deep Interest Network (Zhou et al., KDD 2018), exported by din: click probability per sample \
             and the attention weight of each history position."
                .into(),
        ),
        ..GraphProto::default()
    };
    let proto = ModelProto {
        ir_version: Some(IR_VERSION),
        opset_import: vec![OperatorSetIdProto {
            domain: Some(String::new()),
            version: Some(OPSET),
        }],
        producer_name: Some("din".into()),
        producer_version: Some(env!("CARGO_PKG_VERSION").into()),
        graph: Some(graph),
        metadata_props: metadata
            .iter()
            .map(|(k, v)| StringStringEntryProto {
                key: Some((*k).into()),
                value: Some((*v).into()),
            })
            .collect(),
        ..ModelProto::default()
    };
    let len = proto.encoded_len();
    if len > MAX_MESSAGE {
        return Err(Error::Export(format!(
            "the model is {len} bytes, more than the 2 GiB an ONNX file can hold without external data"
        )));
    }
    Ok(proto.encode_to_vec())
}

/// A dimension of a declared input or output.
enum Dim {
    /// The dynamic batch, `batch`.
    Batch,
    /// A dynamic dimension by name.
    Named(String),
    /// A fixed size.
    Fixed(usize),
}

fn value_info(name: &str, ty: DataType, dims: &[Dim]) -> ValueInfoProto {
    let dim = dims
        .iter()
        .map(|d| Dimension {
            value: Some(match d {
                Dim::Batch => dimension::Value::DimParam("batch".into()),
                Dim::Named(n) => dimension::Value::DimParam(n.clone()),
                Dim::Fixed(n) => dimension::Value::DimValue(*n as i64),
            }),
            ..Dimension::default()
        })
        .collect();
    ValueInfoProto {
        name: Some(name.into()),
        r#type: Some(TypeProto {
            value: Some(type_proto::Value::TensorType(type_proto::Tensor {
                elem_type: Some(ty as i32),
                shape: Some(TensorShapeProto { dim }),
            })),
            ..TypeProto::default()
        }),
        ..ValueInfoProto::default()
    }
}

fn input_info(input: &OnnxInput) -> ValueInfoProto {
    match &input.kind {
        OnnxInputKind::Ids => value_info(&input.name, DataType::Int64, &[Dim::Batch]),
        OnnxInputKind::Dense(d) => value_info(&input.name, DataType::Float, &[Dim::Batch, Dim::Fixed(*d)]),
        OnnxInputKind::Sequence { len } => {
            value_info(&input.name, DataType::Int64, &[Dim::Batch, Dim::Named(len.clone())])
        }
    }
}

fn int_attr(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: Some(name.into()),
        r#type: Some(pb::attribute_proto::AttributeType::Int as i32),
        i: Some(v),
        ..AttributeProto::default()
    }
}

/// Nodes and initializers of the graph being built; every value gets a
/// fresh name from its role and a counter.
#[derive(Default)]
struct Builder {
    nodes: Vec<NodeProto>,
    initializers: Vec<TensorProto>,
    count: usize,
}

impl Builder {
    fn fresh(&mut self, hint: &str) -> String {
        self.count += 1;
        format!("{hint}_{}", self.count)
    }

    /// A float initializer `[dims]` named after `name`.
    fn floats(&mut self, name: &str, dims: &[usize], data: &[f32]) -> String {
        debug_assert_eq!(dims.iter().product::<usize>(), data.len());
        let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor(name, DataType::Float, dims, raw)
    }

    /// An int64 initializer `[dims]`.
    fn ints(&mut self, name: &str, dims: &[usize], data: &[i64]) -> String {
        let raw = data.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.tensor(name, DataType::Int64, dims, raw)
    }

    fn tensor(&mut self, name: &str, ty: DataType, dims: &[usize], raw: Vec<u8>) -> String {
        let name = self.fresh(name);
        self.initializers.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type: Some(ty as i32),
            name: Some(name.clone()),
            raw_data: Some(raw),
            ..TensorProto::default()
        });
        name
    }

    /// A node of `op` over `inputs` with one output, whose name it returns.
    fn node(&mut self, op: &str, inputs: &[&str], attributes: Vec<AttributeProto>) -> String {
        let out = self.fresh(&op.to_lowercase());
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![out.clone()],
            name: Some(format!("{out}_node")),
            op_type: Some(op.into()),
            attribute: attributes,
            ..NodeProto::default()
        });
        out
    }

    /// Gives the value `from` the name `to` (for the graph's outputs).
    fn rename(&mut self, from: &str, to: &str) {
        for n in &mut self.nodes {
            for o in n.output.iter_mut().chain(n.input.iter_mut()) {
                if o == from {
                    *o = to.into();
                }
            }
        }
    }

    fn binary(&mut self, op: &str, a: &str, b: &str) -> String {
        self.node(op, &[a, b], Vec::new())
    }

    fn axes(&mut self, axes: &[i64]) -> String {
        self.ints("axes", &[axes.len()], axes)
    }

    fn unsqueeze(&mut self, x: &str, axis: i64) -> String {
        let axes = self.axes(&[axis]);
        self.node("Unsqueeze", &[x, &axes], Vec::new())
    }

    fn squeeze(&mut self, x: &str, axis: i64) -> String {
        let axes = self.axes(&[axis]);
        self.node("Squeeze", &[x, &axes], Vec::new())
    }

    /// `Concat` along `axis`, or the value itself when there is one.
    fn concat(&mut self, parts: &[String], axis: i64) -> String {
        if let [one] = parts {
            return one.clone();
        }
        let refs: Vec<&str> = parts.iter().map(String::as_str).collect();
        self.node("Concat", &refs, vec![int_attr("axis", axis)])
    }

    /// A float scalar initializer.
    fn scalar(&mut self, name: &str, v: f32) -> String {
        self.floats(name, &[], &[v])
    }

    /// `x·W + b` over the last axis of `x`.
    fn linear(&mut self, x: &str, layer: &Linear, name: &str) -> String {
        let (i, o) = (layer.input_dim(), layer.output_dim());
        let w = self.floats(&format!("{name}.weight"), &[i, o], &layer.weight.value);
        let b = self.floats(&format!("{name}.bias"), &[o], &layer.bias.value);
        let xw = self.binary("MatMul", x, &w);
        self.binary("Add", &xw, &b)
    }

    /// The activation over the last axis (its channels), as
    /// [`crate::model::Rowwise::apply`] computes it at inference.
    fn activation(&mut self, x: &str, act: &Activation, channels: usize, name: &str) -> String {
        let rowwise = act.rowwise(channels);
        let alpha = act.alpha.as_ref().map(|a| a.value.as_slice()).unwrap_or(&[]);
        match act.kind {
            ActivationKind::Relu => self.node("Relu", &[x], Vec::new()),
            ActivationKind::Sigmoid => self.node("Sigmoid", &[x], Vec::new()),
            ActivationKind::Prelu => {
                let a = self.floats(&format!("{name}.alpha"), &[channels], alpha);
                self.binary("PRelu", x, &a)
            }
            ActivationKind::Dice => {
                // x · (α + (1-α)·sigmoid((x - mean) · inv_std))
                let (mean, inv_std) = rowwise.dice_statistics();
                let mean = self.floats(&format!("{name}.moving_mean"), &[channels], mean);
                let inv_std = self.floats(&format!("{name}.inv_std"), &[channels], inv_std);
                let a = self.floats(&format!("{name}.alpha"), &[channels], alpha);
                let one_minus: Vec<f32> = alpha.iter().map(|a| 1.0 - a).collect();
                let one_minus = self.floats(&format!("{name}.one_minus_alpha"), &[channels], &one_minus);
                let centred = self.binary("Sub", x, &mean);
                let z = self.binary("Mul", &centred, &inv_std);
                let p = self.node("Sigmoid", &[&z], Vec::new());
                let scaled = self.binary("Mul", &one_minus, &p);
                let gate = self.binary("Add", &a, &scaled);
                self.binary("Mul", x, &gate)
            }
        }
    }

    /// The blocks of `mlp` (dropout is the identity at inference).
    fn mlp(&mut self, x: &str, mlp: &Mlp, first_index: usize, name: &str) -> String {
        let mut x = x.to_string();
        for (i, b) in mlp.blocks.iter().enumerate() {
            let layer = format!("{name}.{}", first_index + i);
            let pre = self.linear(&x, &b.linear, &layer);
            x = self.activation(&pre, &b.activation, b.linear.output_dim(), &layer);
        }
        x
    }

    /// Rows `ids` (`int64 [..]`) of an embedding table initializer.
    fn gather(&mut self, table: &str, ids: &str) -> String {
        self.node("Gather", &[table, ids], vec![int_attr("axis", 0)])
    }

    /// 1.0 where `ids` (`int64 [B, T]`) is not padding, else 0.0.
    fn mask(&mut self, ids: &str) -> String {
        let zero = self.ints("zero", &[], &[0]);
        let real = self.binary("Greater", ids, &zero);
        self.node("Cast", &[&real], vec![int_attr("to", DataType::Float as i64)])
    }

    /// `Σ_t w[b, t] · v[b, t, :]`: `w` is `[B, T]`, `v` is `[B, T, D]`, the
    /// result `[B, D]`.
    fn weighted_sum(&mut self, w: &str, v: &str) -> String {
        let w3 = self.unsqueeze(w, 1); // [B, 1, T]
        let s = self.binary("MatMul", &w3, v); // [B, 1, D]
        self.squeeze(&s, 1)
    }

    /// The whole model; returns the probability `[B]` and attention `[B, T]` values.
    fn din(&mut self, model: &Din) -> (String, String) {
        let l = &model.layout;
        let tables: Vec<String> = model
            .embeddings
            .iter()
            .zip(&l.tables)
            .map(|(e, t)| {
                self.floats(
                    &format!("embeddings.{}.weight", t.name),
                    &e.weight.shape,
                    &e.weight.value,
                )
            })
            .collect();
        // Sparse features, [B, dim] each.
        let sparse: Vec<String> = l
            .sparse
            .iter()
            .map(|s| self.gather(&tables[s.table], &s.name))
            .collect();
        let mut x: Vec<String> = sparse.clone();
        x.extend(l.dense.iter().map(|(name, _)| name.clone()));
        // Queries [B, Dq] and keys [B, T, Dq].
        let q = self.concat(&l.pairs.iter().map(|&(t, _)| sparse[t].clone()).collect::<Vec<_>>(), 1);
        let keys: Vec<String> = l
            .pairs
            .iter()
            .map(|&(_, h)| {
                let s = &l.sequences[h];
                self.gather(&tables[s.table], &s.name)
            })
            .collect();
        let keys = self.concat(&keys, 2);
        let mask = self.mask(&l.sequences[l.pairs[0].1].name); // [B, T]
        let weights = self.attention_weights(model, &q, &keys, &mask);
        x.push(self.weighted_sum(&weights, &keys)); // [B, Dq]
                                                    // Unpaired sequences: the mean of the real ids' embeddings (0 if none).
        for s in l.unpaired_sequences() {
            let seq = &l.sequences[s];
            let e = self.gather(&tables[seq.table], &seq.name); // [B, T_s, dim]
            let m = self.mask(&seq.name); // [B, T_s]
            let sum = self.weighted_sum(&m, &e); // [B, dim]
            let axes = self.axes(&[1]);
            let count = self.node("ReduceSum", &[&m, &axes], vec![int_attr("keepdims", 1)]); // [B, 1]
            let one = self.scalar("one", 1.0);
            let count = self.binary("Max", &count, &one);
            x.push(self.binary("Div", &sum, &count));
        }
        let x = self.concat(&x, 1); // [B, Din]
        let h = self.mlp(&x, &model.dnn, 0, "dnn");
        let logit = self.linear(&h, &model.output, "output"); // [B, 1]
        let p = self.node("Sigmoid", &[&logit], Vec::new());
        (self.squeeze(&p, 1), weights)
    }

    /// The attention weight of every position, `[B, T]` (0 at padding).
    fn attention_weights(&mut self, model: &Din, q: &str, keys: &str, mask: &str) -> String {
        let att = &model.attention;
        if att.pooling == Pooling::Sum {
            return mask.to_string();
        }
        let first = &att.first.linear;
        let (d, h1) = (first.input_dim() / 4, first.output_dim());
        let w = &first.weight.value; // [4D, H1] over [q, k, q-k, q*k]
        let (wq, wk, wd, wp) = (
            &w[..d * h1],
            &w[d * h1..2 * d * h1],
            &w[2 * d * h1..3 * d * h1],
            &w[3 * d * h1..],
        );
        let wq: Vec<f32> = wq.iter().zip(wd).map(|(a, b)| a + b).collect();
        let wk: Vec<f32> = wk.iter().zip(wd).map(|(a, b)| a - b).collect();
        let wq = self.floats("attention.0.query_weight", &[d, h1], &wq);
        let wk = self.floats("attention.0.key_weight", &[d, h1], &wk);
        let wp = self.floats("attention.0.product_weight", &[d, h1], wp);
        let b1 = self.floats("attention.0.bias", &[h1], &first.bias.value);
        let aq = self.binary("MatMul", q, &wq); // [B, H1]
        let aq = self.unsqueeze(&aq, 1); // [B, 1, H1]
        let ak = self.binary("MatMul", keys, &wk); // [B, T, H1]
        let q3 = self.unsqueeze(q, 1); // [B, 1, Dq]
        let qk = self.binary("Mul", &q3, keys); // [B, T, Dq]
        let ap = self.binary("MatMul", &qk, &wp); // [B, T, H1]
        let pre = self.binary("Add", &aq, &b1);
        let pre = self.binary("Add", &pre, &ak);
        let pre = self.binary("Add", &pre, &ap);
        let h = self.activation(&pre, &att.first.activation, h1, "attention.0");
        let h = self.mlp(&h, &att.rest, 1, "attention");
        let score = self.linear(&h, &att.output, "attention.output"); // [B, T, 1]
        let score = self.squeeze(&score, 2); // [B, T]
        match att.normalization {
            Normalization::None => self.binary("Mul", &score, mask),
            Normalization::Softmax => {
                let one = self.scalar("one", 1.0);
                let pad = self.binary("Sub", &one, mask);
                let big = self.scalar("masked_score", MASKED_SCORE);
                let penalty = self.binary("Mul", &pad, &big);
                let masked = self.binary("Add", &score, &penalty);
                let w = self.node("Softmax", &[&masked], vec![int_attr("axis", -1)]);
                self.binary("Mul", &w, mask) // an empty history pools to 0
            }
        }
    }
}
