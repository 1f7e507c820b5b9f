//! bf16 inference (issue 12): scores within 1e-2 of FP32 on every test
//! model, FP32 unchanged bit for bit after a bf16 round, the bf16 weights
//! made again when the weights change, and `model.precision` carried by a
//! saved model. Runs on the kernel this CPU has: AVX512-BF16 where present
//! (then also checked against the emulation), the emulation everywhere.

mod common;

use din::checkpoint::{load_model, save};
use din::model::bf16::{auto_choice, avx512bf16_speedup, bf16_hardware};
use din::model::{Din, Kernel, Module, Precision, Role};
use din::schema::Config;

/// [`common::randomize`], with weights and embeddings three times as
/// large, so that bf16's rounding shows in the scores.
fn randomize(model: &mut Din, seed: u64) {
    common::randomize(model, seed);
    model.visit_mut("", &mut |_, p| {
        if matches!(p.role, Role::Weight | Role::Embedding) {
            p.value.iter_mut().for_each(|v| *v *= 3.0);
        }
    });
}

fn config(att: &str, norm: &str, dnn: &str, units: &[usize]) -> Config {
    let mut c = common::config(att, norm, dnn);
    c.model.attention.hidden_units = units.to_vec();
    c
}

fn model(config: &Config, seed: u64) -> Din {
    let mut m = Din::new(&common::layout(config), &config.model, seed).unwrap();
    randomize(&mut m, seed + 50);
    m
}

fn worst(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

#[test]
fn bf16_scores_are_within_1e_2_of_fp32_and_fp32_stays_bit_for_bit() {
    let base = common::batch();
    // The four samples, then 30 candidates of one user (shared history).
    let mut rows = vec![0, 1, 2, 3];
    rows.extend(std::iter::repeat_n(1, 30));
    let batch = base.gather(&rows);
    let cases = [
        ("prelu", "none", "prelu", vec![6, 4]),
        ("dice", "softmax", "dice", vec![6, 4]),
        ("sigmoid", "none", "relu", vec![16, 40, 33]),
        ("relu", "softmax", "prelu", vec![64, 256, 128, 64]),
        ("prelu", "none", "dice", vec![256, 128, 64]),
    ];
    for (i, (att, norm, dnn, units)) in cases.into_iter().enumerate() {
        let name = format!("{att}/{norm}/{dnn}/{units:?}");
        let config = config(att, norm, dnn, &units);
        let mut m = model(&config, i as u64);
        assert_eq!(m.kernel(), Kernel::Fp32, "fp32 unless asked");
        let (p32, w32) = m.predict_with_weights(&batch);
        let kernel = m.set_precision(Precision::Bf16);
        assert!(kernel.is_bf16());
        let (p16, w16) = m.predict_with_weights(&batch);
        let (dp, dw) = (worst(&p32, &p16), worst(&w32, &w16));
        eprintln!("{name}: {kernel:?}: probabilities differ by {dp:.2e}, attention weights by {dw:.2e}");
        assert!(dp <= 1e-2, "{name}: probability off by {dp}");
        assert!(
            dw <= 1e-2 * w32.iter().fold(1.0f32, |a, w| a.max(w.abs())),
            "{name}: weights off by {dw}"
        );
        assert!(dw > 0.0, "{name}: bf16 was used");
        if let Some(hw) = bf16_hardware() {
            m.attention.set_kernel(Kernel::Emulated);
            let (pe, we) = m.predict_with_weights(&batch);
            assert!(
                worst(&pe, &p16) <= 1e-5 && worst(&we, &w16) <= 1e-4,
                "{name}: {hw:?} against the emulation"
            );
        }
        assert_eq!(m.set_precision(Precision::Fp32), Kernel::Fp32);
        let (again, wagain) = m.predict_with_weights(&batch);
        assert!(
            again.iter().zip(&p32).all(|(a, b)| a.to_bits() == b.to_bits())
                && wagain.iter().zip(&w32).all(|(a, b)| a.to_bits() == b.to_bits()),
            "{name}: fp32 is bit for bit what it was"
        );
    }
}

#[test]
fn changed_weights_are_rounded_again() {
    let config = config("prelu", "none", "prelu", &[32, 16]);
    let batch = common::batch();
    let mut m = model(&config, 7);
    m.set_precision(Precision::Bf16);
    // Change a layer of each through the Module interface (as optimizers
    // and checkpoint loading do).
    for layer in ["attention.layers.1.weight", "dnn.layers.1.weight"] {
        let before = m.predict(&batch);
        m.visit_mut("", &mut |name, p| {
            if name == layer {
                p.value.iter_mut().for_each(|v| *v = -*v * 2.0);
            }
        });
        let after = m.predict(&batch);
        let mut fresh = m.clone();
        fresh.set_precision(Precision::Bf16);
        assert_ne!(before, after, "{layer}: the change shows");
        assert_eq!(
            after,
            fresh.predict(&batch),
            "{layer}: scores of the new weights, not the old bf16 copy"
        );
    }
}

#[test]
fn auto_is_bf16_only_where_faster_and_a_saved_model_keeps_its_precision() {
    let mut m = model(&config("prelu", "none", "prelu", &[6, 4]), 3);
    assert_eq!(
        m.set_precision(Precision::Auto),
        auto_choice(bf16_hardware(), avx512bf16_speedup)
    );

    let tmp = tempfile::tempdir().unwrap();
    let mut config = config("prelu", "none", "prelu", &[6, 4]);
    save(&tmp.path().join("fp32"), &config, &m, None).unwrap();
    let text = std::fs::read_to_string(tmp.path().join("fp32/config.json")).unwrap();
    assert!(
        !text.contains("precision"),
        "fp32, the default, is left out of config.json"
    );
    assert_eq!(
        load_model(&tmp.path().join("fp32")).unwrap().model.kernel(),
        Kernel::Fp32
    );

    config.model.precision = Precision::Bf16;
    save(&tmp.path().join("bf16"), &config, &m, None).unwrap();
    let loaded = load_model(&tmp.path().join("bf16")).unwrap();
    assert_eq!(loaded.config.model.precision, Precision::Bf16);
    assert!(
        loaded.model.kernel().is_bf16(),
        "a loaded model scores in its config's precision"
    );
    assert_eq!(
        loaded.model, m,
        "the same weights (the precision is not part of the model's value)"
    );

    let bad = Config::from_toml_str("[model]\nprecision = \"fp16\"\n[schema]\nlabel = \"y\"\n").unwrap_err();
    assert!(bad.to_string().contains("fp16"), "{bad}");
}
