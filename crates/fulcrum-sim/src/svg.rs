//! SVG plots, written by hand (no plotting crate): the time-to-first-token CDF of each
//! policy, and each backend's load over time.
//!
//! Plain SVG 1.1 with polylines, axes and a legend; numbers printed with fixed decimals so a
//! plot is byte-identical across runs. Cost: O(points).

use std::fmt::Write as _;

use crate::report::Report;

const W: f64 = 720.0;
const H: f64 = 400.0;
const LEFT: f64 = 60.0;
const RIGHT: f64 = 170.0;
const TOP: f64 = 30.0;
const BOTTOM: f64 = 45.0;
const COLORS: [&str; 10] =
    ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];

fn header(out: &mut String, title: &str) {
    let _ = writeln!(
        out,
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{W}\" height=\"{H}\" viewBox=\"0 0 {W} {H}\" font-family=\"sans-serif\" font-size=\"12\">"
    );
    let _ = writeln!(out, "<rect width=\"{W}\" height=\"{H}\" fill=\"white\"/>");
    let _ = writeln!(
        out,
        "<text x=\"{}\" y=\"18\" text-anchor=\"middle\" font-size=\"14\">{}</text>",
        W / 2.0,
        escape(title)
    );
    let (x0, y0, x1, y1) = (LEFT, H - BOTTOM, W - RIGHT, TOP);
    let _ = writeln!(out, "<path d=\"M{x0} {y1} L{x0} {y0} L{x1} {y0}\" stroke=\"black\" fill=\"none\"/>");
}

fn legend(out: &mut String, names: &[String]) {
    for (i, name) in names.iter().enumerate() {
        let y = TOP + 10.0 + 18.0 * i as f64;
        let x = W - RIGHT + 15.0;
        let c = COLORS[i % COLORS.len()];
        let _ = writeln!(
            out,
            "<line x1=\"{x}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"{c}\" stroke-width=\"2\"/>",
            x + 20.0
        );
        let _ = writeln!(out, "<text x=\"{}\" y=\"{}\">{}</text>", x + 25.0, y + 4.0, escape(name));
    }
}

fn polyline(out: &mut String, points: &[(f64, f64)], color: &str) {
    let mut d = String::new();
    for (x, y) in points {
        let _ = write!(d, "{x:.1},{y:.1} ");
    }
    let _ =
        writeln!(out, "<polyline points=\"{}\" fill=\"none\" stroke=\"{color}\" stroke-width=\"1.5\"/>", d.trim_end());
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;").replace('<', "&lt;").replace('>', "&gt;")
}

/// The CDF of time to first token, one line per report, on a logarithmic time axis.
pub fn ttft_cdf(reports: &[Report]) -> String {
    let mut out = String::new();
    let title = reports.first().map_or(String::new(), |r| format!("{}: time to first token (CDF)", r.scenario));
    header(&mut out, &title);
    let all = reports.iter().flat_map(|r| r.plot.ttft_sorted.iter().copied());
    let (lo, hi) = all.fold((f64::MAX, 0.0f64), |(lo, hi), v| (lo.min(v.max(0.1)), hi.max(v)));
    let (lo, hi) =
        if lo > hi { (1.0, 10.0) } else { (lo.log10().floor(), hi.log10().ceil().max(lo.log10().floor() + 1.0)) };
    let sx = |v: f64| LEFT + (v.max(0.1).log10() - lo) / (hi - lo) * (W - LEFT - RIGHT);
    let sy = |p: f64| H - BOTTOM - p * (H - TOP - BOTTOM);
    for decade in lo as i32..=hi as i32 {
        let x = sx(10f64.powi(decade));
        let label =
            if decade >= 3 { format!("{}s", 10f64.powi(decade - 3)) } else { format!("{}ms", 10f64.powi(decade)) };
        let _ = writeln!(out, "<line x1=\"{x:.1}\" y1=\"{}\" x2=\"{x:.1}\" y2=\"{TOP}\" stroke=\"#ddd\"/>", H - BOTTOM);
        let _ = writeln!(out, "<text x=\"{x:.1}\" y=\"{}\" text-anchor=\"middle\">{label}</text>", H - BOTTOM + 16.0);
    }
    for p in [0.0, 0.5, 0.9, 0.99, 1.0] {
        let _ = writeln!(out, "<text x=\"{}\" y=\"{:.1}\" text-anchor=\"end\">{p}</text>", LEFT - 5.0, sy(p) + 4.0);
    }
    for (i, r) in reports.iter().enumerate() {
        let n = r.plot.ttft_sorted.len().max(1) as f64;
        let points: Vec<(f64, f64)> =
            r.plot.ttft_sorted.iter().enumerate().map(|(k, &v)| (sx(v), sy((k + 1) as f64 / n))).collect();
        polyline(&mut out, &points, COLORS[i % COLORS.len()]);
    }
    legend(&mut out, &reports.iter().map(|r| r.policy.clone()).collect::<Vec<_>>());
    out.push_str("</svg>\n");
    out
}

/// Requests in flight on each backend over time, for one report (at most ten backends drawn).
pub fn load_over_time(report: &Report) -> String {
    let mut out = String::new();
    header(&mut out, &format!("{} / {}: requests in flight per backend", report.scenario, report.policy));
    let series = &report.plot.load;
    let len = series.iter().map(Vec::len).max().unwrap_or(0).max(2);
    let max = series.iter().flatten().copied().max().unwrap_or(1).max(1);
    let span = report.plot.sample_every * (len - 1) as f64;
    let sx = |k: usize| LEFT + k as f64 / (len - 1) as f64 * (W - LEFT - RIGHT);
    let sy = |v: u32| H - BOTTOM - f64::from(v) / f64::from(max) * (H - TOP - BOTTOM);
    let _ = writeln!(out, "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{max}</text>", LEFT - 5.0, TOP + 4.0);
    let _ = writeln!(out, "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">0</text>", LEFT - 5.0, H - BOTTOM + 4.0);
    let _ =
        writeln!(out, "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{span:.1}s</text>", W - RIGHT, H - BOTTOM + 16.0);
    for (b, s) in series.iter().take(COLORS.len()).enumerate() {
        let points: Vec<(f64, f64)> = s.iter().enumerate().map(|(k, &v)| (sx(k), sy(v))).collect();
        polyline(&mut out, &points, COLORS[b]);
    }
    let names: Vec<String> = report.backends.iter().take(COLORS.len()).map(|b| b.name.clone()).collect();
    legend(&mut out, &names);
    out.push_str("</svg>\n");
    out
}

/// Replicas serving over time, one line per policy (autoscaled fleets).
pub fn replicas_over_time(reports: &[Report]) -> String {
    let mut out = String::new();
    let scenario = reports.first().map_or("", |r| r.scenario.as_str());
    header(&mut out, &format!("{scenario}: replicas serving over time"));
    let end = reports.iter().flat_map(|r| r.replicas.last()).map(|&(t, _)| t).fold(1e-9, f64::max);
    let max = reports.iter().flat_map(|r| r.replicas.iter()).map(|&(_, n)| n).max().unwrap_or(1).max(1);
    let sx = |t: f64| LEFT + t / end * (W - LEFT - RIGHT);
    let sy = |v: u32| H - BOTTOM - f64::from(v) / f64::from(max) * (H - TOP - BOTTOM);
    let _ = writeln!(out, "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{max}</text>", LEFT - 5.0, TOP + 4.0);
    let _ = writeln!(out, "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">0</text>", LEFT - 5.0, H - BOTTOM + 4.0);
    let _ = writeln!(out, "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{end:.1}s</text>", W - RIGHT, H - BOTTOM + 16.0);
    for (k, r) in reports.iter().take(COLORS.len()).enumerate() {
        // A step line: the count holds until the next change.
        let mut points = Vec::new();
        for w in r.replicas.windows(2) {
            points.push((sx(w[0].0), sy(w[0].1)));
            points.push((sx(w[1].0), sy(w[0].1)));
        }
        if let Some(&(t, n)) = r.replicas.last() {
            points.push((sx(t), sy(n)));
        }
        polyline(&mut out, &points, COLORS[k]);
    }
    legend(&mut out, &reports.iter().map(|r| r.policy.clone()).collect::<Vec<_>>());
    out.push_str("</svg>\n");
    out
}
