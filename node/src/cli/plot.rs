//! The loss curve `tern finetune` writes beside the adapter, as SVG: an
//! image every browser and editor shows, with no plotting dependency.

use std::fmt::Write;

use kernels::train::StepStats;

const W: f64 = 640.0;
const H: f64 = 360.0;
const PAD: f64 = 48.0;

/// Training loss per step (blue) and held-out loss where it was measured
/// (orange dots), on shared axes.
pub fn loss_svg(history: &[StepStats]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(s, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let points: Vec<(f64, f64)> = history.iter().map(|h| (h.step as f64, h.loss)).collect();
    let evals: Vec<(f64, f64)> = history
        .iter()
        .filter_map(|h| h.eval_loss.map(|e| (h.step as f64, e)))
        .collect();
    let all = points.iter().chain(&evals).filter(|p| p.1.is_finite());
    let (mut x1, mut y0, mut y1) = (1f64, f64::INFINITY, f64::NEG_INFINITY);
    for &(x, y) in all {
        x1 = x1.max(x);
        y0 = y0.min(y);
        y1 = y1.max(y);
    }
    if !y0.is_finite() {
        (y0, y1) = (0.0, 1.0);
    }
    y0 = y0.min(0.0);
    if y1 <= y0 {
        y1 = y0 + 1.0;
    }
    let px = |x: f64| PAD + (x / x1) * (W - 2.0 * PAD);
    let py = |y: f64| H - PAD - (y - y0) / (y1 - y0) * (H - 2.0 * PAD);
    let _ = writeln!(
        s,
        r#"<path d="M{PAD} {PAD} V{} H{}" stroke="black" fill="none"/>"#,
        H - PAD,
        W - PAD
    );
    for i in 0..=4 {
        let y = y0 + (y1 - y0) * f64::from(i) / 4.0;
        let _ = writeln!(
            s,
            r#"<text x="{}" y="{:.1}" text-anchor="end">{y:.2}</text>"#,
            PAD - 6.0,
            py(y) + 4.0
        );
    }
    let _ = writeln!(
        s,
        r#"<text x="{}" y="{}" text-anchor="middle">step (last {x1})</text>"#,
        W / 2.0,
        H - 12.0
    );
    let _ = writeln!(
        s,
        r#"<text x="{PAD}" y="24">loss: <tspan fill="steelblue">training</tspan>, <tspan fill="darkorange">held-out</tspan></text>"#
    );
    if !points.is_empty() {
        let mut d = String::new();
        for (i, &(x, y)) in points.iter().filter(|p| p.1.is_finite()).enumerate() {
            let _ = write!(d, "{}{:.1} {:.1} ", if i == 0 { "M" } else { "L" }, px(x), py(y));
        }
        let _ = writeln!(
            s,
            r#"<path d="{}" stroke="steelblue" stroke-width="1.5" fill="none"/>"#,
            d.trim()
        );
    }
    for &(x, y) in &evals {
        let _ = writeln!(
            s,
            r#"<circle cx="{:.1}" cy="{:.1}" r="3" fill="darkorange"/>"#,
            px(x),
            py(y)
        );
    }
    s.push_str("</svg>\n");
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_curve_has_a_point_per_step_and_a_dot_per_evaluation() {
        let h: Vec<StepStats> = (1..=5)
            .map(|step| StepStats {
                step,
                loss: 5.0 / step as f64,
                tokens: 10,
                seen_tokens: 10,
                lr: 1e-3,
                grad_norm: 1.0,
                eval_loss: (step % 2 == 0).then_some(2.0),
            })
            .collect();
        let svg = loss_svg(&h);
        assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        assert_eq!(svg.matches(" L").count() + svg.matches("\"M").count(), 5 + 1);
        assert_eq!(svg.matches("<circle").count(), 2);
        assert!(!loss_svg(&[]).contains("NaN"));
    }
}
