//! Charts as SVG and PNG (plotters). Text is drawn with the vendored DejaVu Sans through
//! plotters' pure-Rust `ab_glyph` backend, so no system font library is needed.

use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use crate::outfile::TempPath;
use crate::skip::Profile;

static FONT: &[u8] = include_bytes!("../../vendor/fonts/DejaVuSans.ttf");

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The vendored font is a valid TTF; a failure would only lose text in the charts.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// `base` + `.svg` and `base` + `.png` (appended, so dots in `base` stay).
pub fn outputs(base: &Path) -> (PathBuf, PathBuf) {
    let with = |ext: &str| {
        let mut s = base.as_os_str().to_owned();
        s.push(ext);
        PathBuf::from(s)
    };
    (with(".svg"), with(".png"))
}

/// A chart that can be drawn on any plotters backend.
pub trait Chart {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> anyhow::Result<()>
    where
        DB::ErrorType: 'static;
}

/// Draws `chart` to `base.svg` and `base.png` (`w × h` pixels), each written atomically;
/// returns both paths.
pub fn draw_svg_png(
    chart: &impl Chart,
    base: &Path,
    (w, h): (u32, u32),
) -> anyhow::Result<(PathBuf, PathBuf)> {
    register_font();
    let (svg, png) = outputs(base);
    let svg_tmp = TempPath::new(&svg);
    {
        let root = SVGBackend::new(svg_tmp.path(), (w, h)).into_drawing_area();
        chart.draw(&root)?;
        root.present()
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", svg.display()))?;
    }
    let png_tmp = TempPath::new(&png);
    {
        let root = BitMapBackend::new(png_tmp.path(), (w, h)).into_drawing_area();
        chart.draw(&root)?;
        root.present()
            .map_err(|e| anyhow::anyhow!("writing {}: {e}", png.display()))?;
    }
    svg_tmp.persist()?;
    png_tmp.persist()?;
    Ok((svg, png))
}

fn err<E: std::error::Error + Send + Sync + 'static>(e: DrawingAreaErrorKind<E>) -> anyhow::Error {
    anyhow::anyhow!("plotting: {e}")
}

/// The calibration profile, like the paper's Figure 2: per-layer cos(h, h + FFN) (mean and
/// 10–90th percentile band) and Block Influence, cold regions shaded, suggested threshold.
pub struct ProfileChart<'a> {
    pub profile: &'a Profile,
    pub title: String,
}

impl Chart for ProfileChart<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> anyhow::Result<()>
    where
        DB::ErrorType: 'static,
    {
        let p = self.profile;
        let n = p.n_layer;
        root.fill(&WHITE).map_err(err)?;
        let (top, bottom) = root.split_vertically((root.dim_in_pixel().1 as f64 * 0.55) as u32);
        let x_range = -0.5f32..(n as f32 - 0.5);
        let shade = RGBColor(225, 225, 240).filled();
        let cold = |chart: &mut ChartContext<DB, Cartesian2d<_, _>>, y0: f32, y1: f32| {
            let mut rects = Vec::new();
            if p.cold_start > 0 {
                rects.push(Rectangle::new(
                    [(-0.5, y0), (p.cold_start as f32 - 0.5, y1)],
                    shade,
                ));
            }
            if p.cold_end > 0 {
                rects.push(Rectangle::new(
                    [((n - p.cold_end) as f32 - 0.5, y0), (n as f32 - 0.5, y1)],
                    shade,
                ));
            }
            chart.draw_series(rects).map(|_| ()).map_err(err)
        };

        // Top: full range, FFN cosine and Block Influence.
        let mut chart = ChartBuilder::on(&top)
            .caption(&self.title, ("sans-serif", 20))
            .margin(10)
            .x_label_area_size(30)
            .y_label_area_size(50)
            .build_cartesian_2d(x_range.clone(), 0f32..1.05f32)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc("similarity / influence")
            .draw()
            .map_err(err)?;
        cold(&mut chart, 0.0, 1.05)?;
        let mean: Vec<(f32, f32)> = p
            .ffn_cos
            .iter()
            .enumerate()
            .map(|(l, s)| (l as f32, s.mean))
            .collect();
        chart
            .draw_series(LineSeries::new(mean.clone(), BLUE.stroke_width(2)))
            .map_err(err)?
            .label("mean cos(h, h + FFN)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        chart
            .draw_series(LineSeries::new(
                p.block_influence
                    .iter()
                    .enumerate()
                    .map(|(l, &b)| (l as f32, b)),
                RED.stroke_width(2),
            ))
            .map_err(err)?
            .label("Block Influence 1 − cos(in, out)")
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], RED.stroke_width(2)));
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::MiddleRight)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(err)?;

        // Bottom: zoom on the non-cold region's FFN cosine, percentile band and thresholds.
        let (lo, hi) = (p.cold_start, n - p.cold_end);
        let warm = if lo < hi {
            &p.ffn_cos[lo..hi]
        } else {
            &p.ffn_cos[..]
        };
        let y_min = warm
            .iter()
            .map(|s| s.p10)
            .fold(1.0f32, f32::min)
            .clamp(0.0, 0.94)
            - 0.01;
        let mut zoom = ChartBuilder::on(&bottom)
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(50)
            .build_cartesian_2d(x_range, y_min..1.0f32)
            .map_err(err)?;
        zoom.configure_mesh()
            .x_desc("layer")
            .x_label_formatter(&|x| format!("{x:.0}"))
            .y_desc("cos(h, h + FFN)")
            .draw()
            .map_err(err)?;
        cold(&mut zoom, y_min, 1.0)?;
        let mut band: Vec<(f32, f32)> = p
            .ffn_cos
            .iter()
            .enumerate()
            .map(|(l, s)| (l as f32, s.p90))
            .collect();
        band.extend(
            p.ffn_cos
                .iter()
                .enumerate()
                .rev()
                .map(|(l, s)| (l as f32, s.p10.max(y_min))),
        );
        zoom.draw_series(std::iter::once(Polygon::new(band, BLUE.mix(0.2).filled())))
            .map_err(err)?
            .label("10–90th percentile")
            .legend(|(x, y)| Rectangle::new([(x, y - 5), (x + 20, y + 5)], BLUE.mix(0.2).filled()));
        zoom.draw_series(LineSeries::new(
            mean.into_iter().map(|(x, y)| (x, y.max(y_min))),
            BLUE.stroke_width(2),
        ))
        .map_err(err)?
        .label("mean")
        .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], BLUE.stroke_width(2)));
        if let Some(s) = p.nearest(0.25).filter(|s| s.threshold > y_min) {
            let t = s.threshold;
            zoom.draw_series(LineSeries::new(
                [(-0.5, t), (n as f32 - 0.5, t)],
                GREEN.stroke_width(1),
            ))
            .map_err(err)?
            .label(format!("suggested threshold at 25%: {t:.2}"))
            .legend(|(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], GREEN));
        }
        zoom.configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerRight)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(err)?;
        Ok(())
    }
}

/// `ffnskip bench`: decode tokens/s against realized FFN skip ratio, one colour per model
/// (quant type), each policy a labelled point; llama.cpp's full-model speed as a dashed line.
pub struct BenchChart<'a> {
    pub rows: &'a [crate::measure::bench::BenchRow],
    pub title: String,
}

impl Chart for BenchChart<'_> {
    fn draw<DB: DrawingBackend>(&self, root: &DrawingArea<DB, Shift>) -> anyhow::Result<()>
    where
        DB::ErrorType: 'static,
    {
        root.fill(&WHITE).map_err(err)?;
        let mut models: Vec<&str> = Vec::new();
        for r in self.rows {
            if !models.contains(&r.model.as_str()) {
                models.push(&r.model);
            }
        }
        let x_max = self
            .rows
            .iter()
            .map(|r| r.ffn_skip_ratio * 100.0)
            .fold(10.0f64, f64::max)
            * 1.1;
        let y_max = self
            .rows
            .iter()
            .flat_map(|r| {
                [
                    r.decode_tokens_per_s.max,
                    r.llama_cpp_decode_tokens_per_s.median,
                ]
            })
            .fold(1.0f64, f64::max)
            * 1.15;
        let mut chart = ChartBuilder::on(root)
            .caption(&self.title, ("sans-serif", 20))
            .margin(12)
            .x_label_area_size(40)
            .y_label_area_size(55)
            .build_cartesian_2d(-1.0f64..x_max, 0f64..y_max)
            .map_err(err)?;
        chart
            .configure_mesh()
            .x_desc("realized FFN skip ratio (%)")
            .y_desc("decode tokens/s (median)")
            .draw()
            .map_err(err)?;
        for (mi, m) in models.iter().enumerate() {
            let color = Palette99::pick(mi).to_rgba();
            let rows: Vec<_> = self.rows.iter().filter(|r| r.model == *m).collect();
            let label = format!(
                "{} ({})",
                Path::new(m)
                    .file_stem()
                    .map_or_else(|| m.to_string(), |s| s.to_string_lossy().into_owned()),
                rows.first().map_or("", |r| r.quant.as_str())
            );
            chart
                .draw_series(rows.iter().map(|r| {
                    Circle::new(
                        (r.ffn_skip_ratio * 100.0, r.decode_tokens_per_s.median),
                        4,
                        color.filled(),
                    )
                }))
                .map_err(err)?
                .label(label)
                .legend(move |(x, y)| Circle::new((x + 10, y), 4, color.filled()));
            chart
                .draw_series(rows.iter().map(|r| {
                    Text::new(
                        r.policy.split(':').next().unwrap_or("").to_string(),
                        (r.ffn_skip_ratio * 100.0 + 0.4, r.decode_tokens_per_s.median),
                        ("sans-serif", 12).into_font().color(&color),
                    )
                }))
                .map_err(err)?;
            if let Some(r) = rows.first() {
                let y = r.llama_cpp_decode_tokens_per_s.median;
                chart
                    .draw_series(DashedLineSeries::new(
                        [(-1.0, y), (x_max, y)],
                        6,
                        4,
                        color.stroke_width(1),
                    ))
                    .map_err(err)?
                    .label("llama.cpp, full model (same file)")
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
            }
        }
        chart
            .configure_series_labels()
            .background_style(WHITE.mix(0.85))
            .border_style(BLACK)
            .position(SeriesLabelPosition::LowerLeft)
            .label_font(("sans-serif", 13))
            .draw()
            .map_err(err)?;
        Ok(())
    }
}
