//! Small PNG charts: a trial's throughput over time (top) and latency distribution (bottom);
//! and a search's latency against rate.
//!
//! Drawn on an RGB buffer with a built-in 3x5 pixel font, so it needs no font files and no
//! plotting crate; only `png` encodes the result.

use std::io::BufWriter;
use std::path::Path;

type Rgb = [u8; 3];

pub const GRAY: Rgb = [150, 150, 150];
pub const BLUE: Rgb = [31, 119, 180];
pub const GREEN: Rgb = [44, 160, 44];
pub const RED: Rgb = [214, 39, 40];
pub const LIGHT_GREEN: Rgb = [140, 210, 140];
pub const LIGHT_RED: Rgb = [240, 150, 150];
const BLACK: Rgb = [0, 0, 0];
const LIGHT: Rgb = [225, 225, 225];
const WHITE: Rgb = [255, 255, 255];

/// 3x5 glyphs, row by row.
const GLYPHS: &[(char, [&str; 5])] = &[
    ('0', ["111", "101", "101", "101", "111"]),
    ('1', ["010", "110", "010", "010", "111"]),
    ('2', ["111", "001", "111", "100", "111"]),
    ('3', ["111", "001", "111", "001", "111"]),
    ('4', ["101", "101", "111", "001", "001"]),
    ('5', ["111", "100", "111", "001", "111"]),
    ('6', ["111", "100", "111", "101", "111"]),
    ('7', ["111", "001", "001", "001", "001"]),
    ('8', ["111", "101", "111", "101", "111"]),
    ('9', ["111", "101", "111", "001", "111"]),
    ('A', ["010", "101", "111", "101", "101"]),
    ('B', ["110", "101", "110", "101", "110"]),
    ('C', ["011", "100", "100", "100", "011"]),
    ('D', ["110", "101", "101", "101", "110"]),
    ('E', ["111", "100", "110", "100", "111"]),
    ('F', ["111", "100", "110", "100", "100"]),
    ('G', ["011", "100", "101", "101", "011"]),
    ('H', ["101", "101", "111", "101", "101"]),
    ('I', ["111", "010", "010", "010", "111"]),
    ('J', ["001", "001", "001", "101", "010"]),
    ('K', ["101", "101", "110", "101", "101"]),
    ('L', ["100", "100", "100", "100", "111"]),
    ('M', ["101", "111", "111", "101", "101"]),
    ('N', ["110", "101", "101", "101", "101"]),
    ('O', ["010", "101", "101", "101", "010"]),
    ('P', ["110", "101", "110", "100", "100"]),
    ('Q', ["010", "101", "101", "110", "011"]),
    ('R', ["110", "101", "110", "101", "101"]),
    ('S', ["011", "100", "010", "001", "110"]),
    ('T', ["111", "010", "010", "010", "010"]),
    ('U', ["101", "101", "101", "101", "111"]),
    ('V', ["101", "101", "101", "101", "010"]),
    ('W', ["101", "101", "111", "111", "101"]),
    ('X', ["101", "101", "010", "101", "101"]),
    ('Y', ["101", "101", "010", "010", "010"]),
    ('Z', ["111", "001", "010", "100", "111"]),
    (' ', ["000", "000", "000", "000", "000"]),
    ('.', ["000", "000", "000", "000", "010"]),
    (',', ["000", "000", "000", "010", "100"]),
    (':', ["000", "010", "000", "010", "000"]),
    (';', ["000", "010", "000", "010", "100"]),
    ('/', ["001", "001", "010", "100", "100"]),
    ('%', ["101", "001", "010", "100", "101"]),
    ('-', ["000", "000", "111", "000", "000"]),
    ('(', ["001", "010", "010", "010", "001"]),
    (')', ["100", "010", "010", "010", "100"]),
    ('=', ["000", "111", "000", "111", "000"]),
    ('<', ["001", "010", "100", "010", "001"]),
    ('>', ["100", "010", "001", "010", "100"]),
    ('_', ["000", "000", "000", "000", "111"]),
    ('+', ["000", "010", "111", "010", "000"]),
    ('#', ["101", "111", "101", "111", "101"]),
    ('?', ["111", "001", "010", "000", "010"]),
];

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn new(w: usize, h: usize) -> Self {
        Self {
            w,
            h,
            px: vec![255; w * h * 3],
        }
    }

    fn set(&mut self, x: i64, y: i64, c: Rgb) {
        if x < 0 || y < 0 || x as usize >= self.w || y as usize >= self.h {
            return;
        }
        let i = (y as usize * self.w + x as usize) * 3;
        self.px[i..i + 3].copy_from_slice(&c);
    }

    fn rect(&mut self, x0: i64, y0: i64, x1: i64, y1: i64, c: Rgb) {
        for y in y0.min(y1)..=y0.max(y1) {
            for x in x0.min(x1)..=x0.max(x1) {
                self.set(x, y, c);
            }
        }
    }

    fn line(&mut self, (x0, y0): (i64, i64), (x1, y1): (i64, i64), c: Rgb, thick: i64) {
        let (dx, dy) = ((x1 - x0).abs(), -(y1 - y0).abs());
        let (sx, sy) = (if x0 < x1 { 1 } else { -1 }, if y0 < y1 { 1 } else { -1 });
        let (mut x, mut y, mut err) = (x0, y0, dx + dy);
        loop {
            for t in 0..thick {
                self.set(x, y + t, c);
                self.set(x + t, y, c);
            }
            if x == x1 && y == y1 {
                break;
            }
            let e2 = 2 * err;
            if e2 >= dy {
                err += dy;
                x += sx;
            }
            if e2 <= dx {
                err += dx;
                y += sy;
            }
        }
    }

    /// Text with its top-left corner at (x, y); each font pixel is `scale` pixels.
    fn text(&mut self, x: i64, y: i64, s: &str, scale: i64, c: Rgb) {
        let mut cx = x;
        for ch in s.chars() {
            let ch = ch.to_ascii_uppercase();
            let glyph = GLYPHS
                .iter()
                .find(|(g, _)| *g == ch)
                .map(|(_, rows)| rows)
                .unwrap_or(&GLYPHS[GLYPHS.len() - 1].1);
            for (r, row) in glyph.iter().enumerate() {
                for (col, bit) in row.bytes().enumerate() {
                    if bit == b'1' {
                        self.rect(
                            cx + col as i64 * scale,
                            y + r as i64 * scale,
                            cx + col as i64 * scale + scale - 1,
                            y + r as i64 * scale + scale - 1,
                            c,
                        );
                    }
                }
            }
            cx += 4 * scale;
        }
    }

    fn text_width(s: &str, scale: i64) -> i64 {
        s.chars().count() as i64 * 4 * scale
    }

    fn save(&self, path: &Path) -> anyhow::Result<()> {
        let file = std::fs::File::create(path)?;
        let mut enc = png::Encoder::new(BufWriter::new(file), self.w as u32, self.h as u32);
        enc.set_color(png::ColorType::Rgb);
        enc.set_depth(png::BitDepth::Eight);
        let mut writer = enc.write_header()?;
        writer.write_image_data(&self.px)?;
        Ok(())
    }
}

/// A line on the throughput panel: (seconds, per second) points.
pub struct Series {
    pub name: String,
    pub color: Rgb,
    pub points: Vec<(f64, f64)>,
}

/// A latency distribution: histogram buckets (upper bound in microseconds, count).
pub struct Distribution {
    pub name: String,
    pub color: Rgb,
    pub buckets: Vec<(f64, u64)>,
}

/// A value marked on the latency panel (a percentile).
pub struct Marker {
    pub label: String,
    pub ms: f64,
    pub color: Rgb,
}

/// Rounds up to 1, 2 or 5 times a power of ten.
fn nice(v: f64) -> f64 {
    if v <= 0.0 {
        return 1.0;
    }
    let p = 10f64.powf(v.log10().floor());
    for m in [1.0, 2.0, 5.0, 10.0] {
        if m * p >= v {
            return m * p;
        }
    }
    10.0 * p
}

fn fmt_num(v: f64) -> String {
    if v >= 1000.0 && (v / 1000.0).fract() == 0.0 {
        format!("{}K", v / 1000.0)
    } else if v >= 1000.0 {
        format!("{:.1}K", v / 1000.0)
    } else if v.fract() == 0.0 {
        format!("{v}")
    } else {
        format!("{v:.1}")
    }
}

fn fmt_ms(us: f64) -> String {
    let ms = us / 1000.0;
    let trim = |s: String| {
        if s.contains('.') {
            s.trim_end_matches('0').trim_end_matches('.').to_owned()
        } else {
            s
        }
    };
    if ms >= 1000.0 {
        format!("{}S", trim(format!("{:.2}", ms / 1000.0)))
    } else if ms >= 100.0 {
        format!("{ms:.0}MS")
    } else if ms >= 1.0 {
        format!("{}MS", trim(format!("{ms:.1}")))
    } else {
        format!("{}MS", trim(format!("{ms:.2}")))
    }
}

/// Draws the two panels and writes a PNG.
pub fn render(
    path: &Path,
    title: &str,
    subtitle: &str,
    series: &[Series],
    dists: &[Distribution],
    markers: &[Marker],
) -> anyhow::Result<()> {
    let (w, h) = (1100usize, 760usize);
    let mut c = Canvas::new(w, h);
    c.text(20, 12, title, 3, BLACK);
    c.text(20, 34, subtitle, 2, [80, 80, 80]);

    // Top panel: throughput over time.
    let (px0, py0, pw, ph) = (90i64, 80i64, 960i64, 260i64);
    let tmax = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .fold(1.0f64, f64::max);
    let ymax = nice(
        series
            .iter()
            .flat_map(|s| s.points.iter().map(|p| p.1))
            .fold(1.0f64, f64::max)
            * 1.05,
    );
    let xs = |t: f64| px0 + (t / tmax * pw as f64) as i64;
    let ys = |v: f64| py0 + ph - (v / ymax * ph as f64) as i64;
    for i in 0..=5 {
        let v = ymax * i as f64 / 5.0;
        let y = ys(v);
        c.line((px0, y), (px0 + pw, y), LIGHT, 1);
        let label = fmt_num(v);
        c.text(
            px0 - 8 - Canvas::text_width(&label, 2),
            y - 5,
            &label,
            2,
            BLACK,
        );
    }
    let tstep = nice(tmax / 10.0);
    let mut t = 0.0;
    while t <= tmax + 1e-9 {
        let x = xs(t);
        c.line((x, py0), (x, py0 + ph), LIGHT, 1);
        let label = fmt_num(t);
        c.text(
            x - Canvas::text_width(&label, 2) / 2,
            py0 + ph + 8,
            &label,
            2,
            BLACK,
        );
        t += tstep;
    }
    c.line((px0, py0 + ph), (px0 + pw, py0 + ph), BLACK, 1);
    c.line((px0, py0), (px0, py0 + ph), BLACK, 1);
    c.text(px0, py0 - 16, "MESSAGES PER SECOND", 2, BLACK);
    c.text(
        px0 + pw - 150,
        py0 + ph + 24,
        "SECONDS SINCE START",
        2,
        BLACK,
    );
    for s in series {
        let mut prev: Option<(i64, i64)> = None;
        for &(t, v) in &s.points {
            let p = (xs(t), ys(v));
            if let Some(q) = prev {
                c.line(q, p, s.color, 2);
            }
            prev = Some(p);
        }
    }
    let mut lx = px0 + 300;
    for s in series {
        c.rect(lx, py0 - 14, lx + 14, py0 - 6, s.color);
        c.text(lx + 20, py0 - 16, &s.name, 2, BLACK);
        lx += 40 + Canvas::text_width(&s.name, 2);
    }

    // Bottom panel: latency histogram, log-scaled time axis.
    let (qx0, qy0, qw, qh) = (90i64, 450i64, 960i64, 240i64);
    let nonzero: Vec<f64> = dists
        .iter()
        .flat_map(|d| d.buckets.iter().filter(|b| b.1 > 0).map(|b| b.0))
        .collect();
    let lo = nonzero.iter().copied().fold(f64::MAX, f64::min).max(100.0);
    let hi = nonzero
        .iter()
        .copied()
        .fold(0.0f64, f64::max)
        .max(lo * 10.0);
    let (dlo, dhi) = (lo.log10().floor(), hi.log10().ceil() + 0.3);
    let lx_of = |us: f64| qx0 + (((us.max(1.0)).log10() - dlo) / (dhi - dlo) * qw as f64) as i64;
    let total_max = dists
        .iter()
        .map(|d| {
            let n: u64 = d.buckets.iter().map(|b| b.1).sum();
            let m = d.buckets.iter().map(|b| b.1).max().unwrap_or(0);
            if n == 0 {
                0.0
            } else {
                m as f64 / n as f64
            }
        })
        .fold(0.0f64, f64::max);
    let fmax = nice((total_max * 100.0).max(1.0));
    let qy = |f: f64| qy0 + qh - (f * 100.0 / fmax * qh as f64) as i64;
    for i in 0..=4 {
        let f = fmax * i as f64 / 4.0;
        let y = qy0 + qh - (i as f64 / 4.0 * qh as f64) as i64;
        c.line((qx0, y), (qx0 + qw, y), LIGHT, 1);
        let label = format!("{}%", fmt_num(f));
        c.text(
            qx0 - 8 - Canvas::text_width(&label, 2),
            y - 5,
            &label,
            2,
            BLACK,
        );
    }
    let mut d = dlo;
    while d <= dhi - 0.3 + 1e-9 {
        let us = 10f64.powf(d);
        let x = lx_of(us);
        c.line((x, qy0), (x, qy0 + qh), LIGHT, 1);
        let label = fmt_ms(us);
        c.text(
            x - Canvas::text_width(&label, 2) / 2,
            qy0 + qh + 8,
            &label,
            2,
            BLACK,
        );
        d += 1.0;
    }
    c.line((qx0, qy0 + qh), (qx0 + qw, qy0 + qh), BLACK, 1);
    c.line((qx0, qy0), (qx0, qy0 + qh), BLACK, 1);
    c.text(
        qx0,
        qy0 - 40,
        "LATENCY FROM SCHEDULED SEND (SHARE OF MESSAGES PER BUCKET)",
        2,
        BLACK,
    );
    let mut lx = qx0;
    for dist in dists {
        c.rect(lx, qy0 - 20, lx + 14, qy0 - 12, dist.color);
        c.text(lx + 20, qy0 - 22, &dist.name, 2, BLACK);
        lx += 40 + Canvas::text_width(&dist.name, 2);
    }
    for dist in dists {
        let n: u64 = dist.buckets.iter().map(|b| b.1).sum();
        if n == 0 {
            continue;
        }
        let mut prev_bound = 0.0f64;
        let mut prev: Option<(i64, i64)> = None;
        for &(bound, count) in &dist.buckets {
            let f = count as f64 / n as f64;
            let (xa, xb) = (lx_of(prev_bound.max(10f64.powf(dlo))), lx_of(bound));
            prev_bound = bound;
            if bound < 10f64.powf(dlo) {
                continue;
            }
            let y = qy(f);
            // A step outline per distribution, so several can overlap.
            if let Some(q) = prev {
                c.line(q, (xa, y), dist.color, 2);
            }
            c.line((xa, y), (xb, y), dist.color, 2);
            prev = Some((xb, y));
        }
    }
    let mut my = qy0 + 4;
    for m in markers {
        let x = lx_of(m.ms * 1000.0);
        let mut y = qy0;
        while y < qy0 + qh {
            c.line((x, y), (x, (y + 4).min(qy0 + qh)), m.color, 1);
            y += 8;
        }
        let label = format!("{} {}", m.label, fmt_ms(m.ms * 1000.0));
        let wl = Canvas::text_width(&label, 2);
        // Labels go left of their line when they would run off the panel.
        let lx = if x + 6 + wl > qx0 + qw {
            x - 6 - wl
        } else {
            x + 5
        };
        c.rect(lx - 2, my - 2, lx + wl + 1, my + 11, WHITE);
        c.text(lx, my, &label, 2, m.color);
        my += 16;
    }
    c.save(path)
}

/// Latency (log scale) against rate: one line per series through its (rate, ms) points,
/// dashed horizontal lines at `targets` and dashed vertical lines at `rates` (label, rate).
pub fn render_curve(
    path: &Path,
    title: &str,
    subtitle: &str,
    series: &[Series],
    targets: &[Marker],
    rates: &[(String, f64)],
) -> anyhow::Result<()> {
    let (w, h) = (1100usize, 660usize);
    let mut c = Canvas::new(w, h);
    c.text(20, 12, title, 3, BLACK);
    c.text(20, 34, subtitle, 2, [80, 80, 80]);
    let (px0, py0, pw, ph) = (90i64, 110i64, 900i64, 460i64);

    // The x axis ends at the first whole step above the highest rate.
    let xhigh = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.0))
        .chain(rates.iter().map(|r| r.1))
        .fold(1.0f64, f64::max)
        * 1.05;
    let xstep = nice(xhigh / 8.0);
    let xmax = (xhigh / xstep).ceil() * xstep;
    let values: Vec<f64> = series
        .iter()
        .flat_map(|s| s.points.iter().map(|p| p.1))
        .chain(targets.iter().map(|t| t.ms))
        .filter(|v| *v > 0.0)
        .collect();
    let lo = values.iter().copied().fold(f64::MAX, f64::min).min(1.0);
    let hi = values.iter().copied().fold(0.0f64, f64::max).max(lo * 10.0);
    let (dlo, dhi) = (lo.log10().floor(), hi.log10().ceil());
    let xs = |v: f64| px0 + (v / xmax * pw as f64) as i64;
    let ys = |ms: f64| {
        let l = ms.max(10f64.powf(dlo)).log10();
        py0 + ph - ((l - dlo) / (dhi - dlo) * ph as f64) as i64
    };

    // Grid: 1, 2 and 5 of every decade; labelled at each.
    let mut d = dlo;
    while d < dhi + 1e-9 {
        for m in [1.0, 2.0, 5.0] {
            let ms = m * 10f64.powf(d);
            if ms > 10f64.powf(dhi) * 1.0001 {
                break;
            }
            let y = ys(ms);
            c.line((px0, y), (px0 + pw, y), LIGHT, 1);
            let label = fmt_ms(ms * 1000.0);
            c.text(
                px0 - 8 - Canvas::text_width(&label, 2),
                y - 5,
                &label,
                2,
                BLACK,
            );
        }
        d += 1.0;
    }
    let mut x = 0.0;
    while x <= xmax + 1e-9 {
        let px = xs(x);
        c.line((px, py0), (px, py0 + ph), LIGHT, 1);
        let label = fmt_num(x);
        c.text(
            px - Canvas::text_width(&label, 2) / 2,
            py0 + ph + 8,
            &label,
            2,
            BLACK,
        );
        x += xstep;
    }
    c.line((px0, py0 + ph), (px0 + pw, py0 + ph), BLACK, 1);
    c.line((px0, py0), (px0, py0 + ph), BLACK, 1);
    c.text(
        px0,
        py0 - 40,
        "LATENCY FROM SCHEDULED SEND (LOG SCALE)",
        2,
        BLACK,
    );
    let xlabel = "MESSAGES PER SECOND (OPEN LOOP)";
    c.text(
        px0 + pw - Canvas::text_width(xlabel, 2),
        py0 + ph + 26,
        xlabel,
        2,
        BLACK,
    );

    for t in targets {
        let y = ys(t.ms);
        let mut x = px0;
        while x < px0 + pw {
            c.line((x, y), ((x + 6).min(px0 + pw), y), t.color, 1);
            x += 12;
        }
        c.text(px0 + pw + 6, y - 5, &t.label, 2, t.color);
    }
    for (label, rate) in rates {
        let x = xs(*rate);
        let mut y = py0;
        while y < py0 + ph {
            c.line((x, y), (x, (y + 4).min(py0 + ph)), GRAY, 1);
            y += 8;
        }
        // At the bottom of the panel: latencies seldom reach down there.
        let wl = Canvas::text_width(label, 2);
        c.rect(
            x - wl / 2 - 2,
            py0 + ph - 18,
            x + wl / 2 + 1,
            py0 + ph - 5,
            WHITE,
        );
        c.text(x - wl / 2, py0 + ph - 16, label, 2, [80, 80, 80]);
    }
    for s in series {
        let mut prev: Option<(i64, i64)> = None;
        for &(rate, ms) in &s.points {
            let p = (xs(rate), ys(ms));
            if let Some(q) = prev {
                c.line(q, p, s.color, 2);
            }
            c.rect(p.0 - 3, p.1 - 3, p.0 + 3, p.1 + 3, s.color);
            prev = Some(p);
        }
    }
    let mut lx = px0;
    for s in series {
        c.rect(lx, py0 - 20, lx + 14, py0 - 12, s.color);
        c.text(lx + 20, py0 - 22, &s.name, 2, BLACK);
        lx += 40 + Canvas::text_width(&s.name, 2);
    }
    c.save(path)
}
