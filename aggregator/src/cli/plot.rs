//! `flotilla forecast TARGET --plot FILE.svg`: history, forecast, prediction interval and
//! anomalies drawn as an SVG file (plotters, SVG backend only, no fonts or bitmaps needed).

use std::path::Path;

use anyhow::Context as _;
use plotters::prelude::*;

use crate::analytics::ForecastView;
use crate::analytics::series::HOUR_MS;

/// Draws `view` into `path` (width x height pixels).
pub fn forecast_svg(view: &ForecastView, path: &Path, size: (u32, u32)) -> anyhow::Result<()> {
    let hours = |ms: i64| (ms - view.history_start_ms) as f64 / HOUR_MS as f64;
    let history: Vec<(f64, f64)> =
        view.history.iter().enumerate().filter_map(|(i, v)| v.map(|v| (i as f64, v))).collect();
    let (mut x_max, mut y_min, mut y_max) = (view.history.len() as f64, f64::MAX, f64::MIN);
    for (_, v) in &history {
        y_min = y_min.min(*v);
        y_max = y_max.max(*v);
    }
    let mut fc = Vec::new();
    let mut band = Vec::new();
    if let Some(f) = &view.forecast {
        let start = hours(f.start_ms);
        for (k, ((p, lo), hi)) in f.point.iter().zip(&f.lower).zip(&f.upper).enumerate() {
            let x = start + k as f64;
            fc.push((x, *p));
            band.push((x, *lo, *hi));
            y_min = y_min.min(*lo);
            y_max = y_max.max(*hi);
            x_max = x_max.max(x + 1.0);
        }
    }
    if y_min > y_max {
        anyhow::bail!("{} has no data to plot", view.target);
    }
    let pad = ((y_max - y_min) * 0.05).max(1e-9);
    let svg = SVGBackend::new(path, size).into_drawing_area();
    let draw = |e: DrawingAreaErrorKind<_>| anyhow::anyhow!("drawing {}: {e:?}", path.display());
    svg.fill(&WHITE).map_err(draw)?;
    let mut chart = ChartBuilder::on(&svg)
        .margin(20)
        .x_label_area_size(30)
        .y_label_area_size(60)
        .caption(format!("{} ({})", view.target, view.metric), ("sans-serif", 18))
        .build_cartesian_2d(0.0..x_max, (y_min - pad)..(y_max + pad))
        .map_err(draw)?;
    chart
        .configure_mesh()
        .x_desc("hours since the start of the history")
        .y_desc(view.metric.as_str())
        .draw()
        .map_err(draw)?;
    if !band.is_empty() {
        let mut poly: Vec<(f64, f64)> = band.iter().map(|(x, _, hi)| (*x, *hi)).collect();
        poly.extend(band.iter().rev().map(|(x, lo, _)| (*x, *lo)));
        chart
            .draw_series(std::iter::once(Polygon::new(poly, BLUE.mix(0.15).filled())))
            .map_err(draw)?
            .label("interval");
    }
    chart
        .draw_series(LineSeries::new(history.iter().copied(), &BLACK))
        .map_err(draw)?
        .label("history")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLACK));
    chart
        .draw_series(LineSeries::new(fc.iter().copied(), &BLUE))
        .map_err(draw)?
        .label("forecast")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE));
    chart
        .draw_series(
            view.anomalies
                .iter()
                .map(|a| Circle::new((hours(a.unix_ms), a.value), 4, RED.filled())),
        )
        .map_err(draw)?
        .label("anomaly")
        .legend(|(x, y)| Circle::new((x + 10, y), 4, RED.filled()));
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.8))
        .border_style(BLACK)
        .draw()
        .map_err(draw)?;
    svg.present().map_err(draw).with_context(|| format!("writing {}", path.display()))?;
    Ok(())
}
