//! Early stopping: stop when a monitored metric has not improved for a while.

use crate::metrics::Metrics;
use crate::schema::{EarlyStoppingConfig, Monitor};

/// Tracks the best value of the monitored metric.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct EarlyStopping {
    config: EarlyStoppingConfig,
    best: Option<f64>,
    best_epoch: usize,
    since_best: usize,
}

impl EarlyStopping {
    /// A tracker for `config`.
    pub fn new(config: EarlyStoppingConfig) -> Self {
        EarlyStopping {
            config,
            best: None,
            best_epoch: 0,
            since_best: 0,
        }
    }

    /// The monitored value in `metrics` (None if undefined, e.g. AUC of one class).
    pub fn value(monitor: Monitor, metrics: &Metrics) -> Option<f64> {
        match monitor {
            Monitor::ValLogloss => Some(metrics.logloss).filter(|v| v.is_finite()),
            Monitor::ValAuc => metrics.auc,
            Monitor::ValGauc => metrics.gauc,
        }
    }

    /// Records an epoch's validation metrics; returns whether it is the best so far.
    pub fn observe(&mut self, epoch: usize, metrics: &Metrics) -> bool {
        // An undefined value (e.g. AUC of a one-class validation set) is no
        // evidence either way: it neither improves nor uses up patience.
        let Some(v) = Self::value(self.config.monitor, metrics) else {
            return false;
        };
        let better = match (self.best, self.config.monitor) {
            (None, _) => true,
            (Some(b), Monitor::ValLogloss) => v < b,
            (Some(b), _) => v > b,
        };
        if better {
            self.best = Some(v);
            self.best_epoch = epoch;
            self.since_best = 0;
        } else {
            self.since_best += 1;
        }
        better
    }

    /// Whether `patience` epochs have passed without improvement.
    pub fn should_stop(&self) -> bool {
        self.since_best >= self.config.patience
    }

    /// The best epoch (1-based) and value so far.
    pub fn best(&self) -> Option<(usize, f64)> {
        self.best.map(|b| (self.best_epoch, b))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(logloss: f64, auc: f64) -> Metrics {
        Metrics {
            n: 10,
            positives: 5,
            logloss,
            auc: Some(auc),
            gauc: None,
        }
    }

    #[test]
    fn stops_after_patience_epochs_without_improvement() {
        let config = EarlyStoppingConfig {
            monitor: Monitor::ValLogloss,
            patience: 2,
            restore_best: false,
        };
        let mut es = EarlyStopping::new(config);
        assert!(es.observe(1, &m(0.5, 0.6)));
        assert!(!es.observe(2, &m(0.6, 0.6)));
        assert!(!es.should_stop());
        assert!(!es.observe(3, &m(0.55, 0.6)));
        assert!(es.should_stop());
        assert_eq!(es.best(), Some((1, 0.5)));
    }

    #[test]
    fn undefined_values_neither_improve_nor_use_patience() {
        let config = EarlyStoppingConfig {
            monitor: Monitor::ValAuc,
            patience: 1,
            restore_best: false,
        };
        let mut es = EarlyStopping::new(config);
        let one_class = Metrics {
            n: 10,
            positives: 0,
            logloss: 0.1,
            auc: None,
            gauc: None,
        };
        assert!(!es.observe(1, &one_class));
        assert!(!es.should_stop());
        assert!(es.observe(2, &m(0.5, 0.6)));
        assert!(!es.observe(3, &one_class));
        assert!(!es.should_stop());
    }

    #[test]
    fn auc_is_maximised() {
        let config = EarlyStoppingConfig {
            monitor: Monitor::ValAuc,
            patience: 1,
            restore_best: false,
        };
        let mut es = EarlyStopping::new(config);
        es.observe(1, &m(0.5, 0.6));
        assert!(
            es.observe(2, &m(0.9, 0.7)),
            "higher AUC is better even with worse logloss"
        );
        assert!(!es.observe(3, &m(0.1, 0.65)));
        assert!(es.should_stop());
    }
}
