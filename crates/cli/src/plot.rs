//! The loss-curve PNG of a training run, drawn with plotters.
//!
//! Text needs a TrueType font; plotters' `ab_glyph` backend takes one as bytes, so the system's
//! DejaVu Sans (Debian's `fonts-dejavu-core`) is registered when present. Without it the curve
//! is drawn without labels rather than failing the run.

use anyhow::{anyhow, Result};
use plotters::prelude::*;
use std::path::Path;

const FONTS: &[&str] = &[
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
];

fn register_font() -> bool {
    static ONCE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *ONCE.get_or_init(|| {
        for p in FONTS {
            if let Ok(bytes) = std::fs::read(p) {
                let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
                if plotters::style::register_font("sans-serif", FontStyle::Normal, bytes).is_ok() {
                    return true;
                }
            }
        }
        false
    })
}

/// Train loss per step and validation loss at eval steps, in nats per token.
pub fn loss_curve(
    path: &Path,
    train: &[(u64, f64)],
    val: &[(u64, f64)],
    title: &str,
) -> Result<()> {
    let labels = register_font();
    let root = BitMapBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE)
        .map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
    let max_step = train
        .iter()
        .chain(val)
        .map(|p| p.0)
        .max()
        .unwrap_or(1)
        .max(1);
    let ys = train
        .iter()
        .chain(val)
        .map(|p| p.1)
        .filter(|v| v.is_finite());
    let (lo, hi) = ys.fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), v| {
        (a.min(v), b.max(v))
    });
    let (lo, hi) = if lo.is_finite() {
        (lo * 0.95, hi * 1.02)
    } else {
        (0.0, 1.0)
    };
    let mut builder = ChartBuilder::on(&root);
    builder.margin(20);
    if labels {
        builder
            .caption(title, ("sans-serif", 22))
            .x_label_area_size(40)
            .y_label_area_size(60);
    }
    let mut chart = builder
        .build_cartesian_2d(0u64..max_step, lo..hi)
        .map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
    if labels {
        chart
            .configure_mesh()
            .x_desc("step")
            .y_desc("loss (nats / token)")
            .draw()
            .map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
    }
    let train_series = chart
        .draw_series(LineSeries::new(train.iter().copied(), BLUE.mix(0.6)))
        .map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
    if labels {
        train_series
            .label("train")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    }
    let val_series = chart
        .draw_series(LineSeries::new(val.iter().copied(), RED.stroke_width(2)))
        .map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
    if labels {
        val_series
            .label("validation")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.8))
            .border_style(BLACK)
            .draw()
            .map_err(|e| anyhow!("drawing {}: {e}", path.display()))?;
    }
    root.present()
        .map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
    Ok(())
}
