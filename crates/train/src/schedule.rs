//! Learning-rate schedules: the multiplier of each parameter group's base learning rate at a step.
//!
//! - Warmup + cosine (GPT-3, nanoGPT): linear warmup from 0 to 1 over `warmup` steps, then a
//!   half cosine from 1 down to `min_ratio` at the last step.
//! - Warmup-stable-decay (Hu et al. 2024, MiniCPM; nanochat): linear warmup, a flat stretch at 1,
//!   then a linear decay to `min_ratio` over the last `decay_fraction` of the run.
//!
//! Both depend on the length of the whole run, which is why `--steps` is fixed when a run starts
//! and a resumed run keeps it.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Schedule {
    Cosine {
        warmup: u64,
        min_ratio: f64,
    },
    Wsd {
        warmup: u64,
        decay_fraction: f64,
        min_ratio: f64,
    },
    Constant,
}

impl Schedule {
    /// The multiplier for optimizer step `step` (0-based) of a run of `total` steps.
    pub fn multiplier(&self, step: u64, total: u64) -> f64 {
        let total = total.max(1);
        match *self {
            Schedule::Constant => 1.0,
            Schedule::Cosine { warmup, min_ratio } => {
                if step < warmup {
                    return (step + 1) as f64 / warmup as f64;
                }
                let span = total.saturating_sub(warmup).max(1) as f64;
                let progress = ((step - warmup) as f64 / span).min(1.0);
                min_ratio
                    + (1.0 - min_ratio) * 0.5 * (1.0 + (std::f64::consts::PI * progress).cos())
            }
            Schedule::Wsd {
                warmup,
                decay_fraction,
                min_ratio,
            } => {
                if step < warmup {
                    return (step + 1) as f64 / warmup as f64;
                }
                let decay_steps = ((total as f64) * decay_fraction).round().max(1.0);
                let decay_start = total as f64 - decay_steps;
                let s = step as f64;
                if s < decay_start {
                    1.0
                } else {
                    let progress = ((s - decay_start + 1.0) / decay_steps).min(1.0);
                    1.0 - (1.0 - min_ratio) * progress
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cosine_warms_up_then_decays_to_the_floor() {
        let s = Schedule::Cosine {
            warmup: 10,
            min_ratio: 0.1,
        };
        assert!((s.multiplier(0, 100) - 0.1).abs() < 1e-12);
        assert!((s.multiplier(9, 100) - 1.0).abs() < 1e-12);
        assert!((s.multiplier(10, 100) - 1.0).abs() < 1e-12);
        // Halfway through the cosine part the multiplier is halfway to the floor.
        assert!((s.multiplier(55, 100) - 0.55).abs() < 1e-12);
        assert!((s.multiplier(100, 100) - 0.1).abs() < 1e-12);
        let mut prev = f64::INFINITY;
        for step in 10..100 {
            let m = s.multiplier(step, 100);
            assert!(m <= prev, "cosine must not increase after warmup");
            prev = m;
        }
    }

    #[test]
    fn wsd_is_flat_then_decays_linearly() {
        let s = Schedule::Wsd {
            warmup: 5,
            decay_fraction: 0.2,
            min_ratio: 0.0,
        };
        assert!((s.multiplier(4, 100) - 1.0).abs() < 1e-12);
        assert_eq!(s.multiplier(50, 100), 1.0);
        assert_eq!(s.multiplier(79, 100), 1.0);
        assert!((s.multiplier(80, 100) - 0.95).abs() < 1e-12);
        assert!((s.multiplier(99, 100) - 0.0).abs() < 1e-12);
    }
}
