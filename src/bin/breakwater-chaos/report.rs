//! A run's report: `result.json` for machines, `report.md` for people, and
//! `timeline.svg`: acknowledged events, spool depth and refused requests over time,
//! with each breaker's open periods shaded.

use std::fmt::Write as _;
use std::path::Path;

use serde_json::Value;

use crate::Sample;

pub fn write(dir: &Path, result: &Value, samples: &[Sample]) -> std::io::Result<()> {
    std::fs::write(dir.join("result.json"), serde_json::to_string_pretty(result)?)?;
    std::fs::write(
        dir.join("timeline.json"),
        serde_json::to_string(samples).map_err(std::io::Error::other)?,
    )?;
    std::fs::write(dir.join("timeline.svg"), svg(samples, result))?;
    std::fs::write(dir.join("report.md"), markdown(result))?;
    Ok(())
}

fn markdown(result: &Value) -> String {
    let mut md = String::new();
    let _ = writeln!(
        md,
        "# {}\n\n{}\n",
        result["scenario"].as_str().unwrap_or(""),
        result["description"].as_str().unwrap_or("")
    );
    let _ = writeln!(
        md,
        "**{}** — {}\n",
        if result["passed"] == true { "PASS" } else { "FAIL" },
        result["verdict"].as_str().unwrap_or("")
    );
    let _ = writeln!(md, "| figure | value |\n|---|---|");
    for (label, key) in [
        ("requests sent (incl. retries)", "requests"),
        ("events sent", "sent_events"),
        ("events acknowledged", "acked_events"),
        ("requests refused (503/429/nack)", "refused_requests"),
        ("refusals by code", "refused_by_code"),
        ("connection errors", "connection_errors"),
        ("load duration (s)", "load_seconds"),
        ("spools drained at (s)", "drained_at_seconds"),
        ("time to recover after the last fault (s)", "time_to_recover_seconds"),
        (
            "breaker openings (reopenings after failed probes included)",
            "breaker_opens",
        ),
        ("breaker outages (closed, open, closed again)", "breaker_outages"),
    ] {
        let _ = writeln!(md, "| {label} | {} |", result[key]);
    }
    for note in result["notes"].as_array().into_iter().flatten() {
        let _ = writeln!(md, "\n**Note:** {}", note.as_str().unwrap_or(""));
    }
    let _ = writeln!(md, "\nSinks: `{}`\n\nFaults:\n", result["sinks"]);
    for fault in result["faults"].as_array().into_iter().flatten() {
        let _ = writeln!(
            md,
            "- {} {} at {:.1} s until {:.1} s",
            fault["action"].as_str().unwrap_or(""),
            fault["target"].as_str().unwrap_or(""),
            fault["at_seconds"].as_f64().unwrap_or(0.0),
            fault["end_seconds"].as_f64().unwrap_or(0.0)
        );
    }
    let _ = writeln!(md, "\n![timeline](timeline.svg)");
    md
}

/// A plotted line: its label, its colour, and how to read it from a sample.
type Series = (&'static str, &'static str, Box<dyn Fn(&Sample) -> f64>);

fn svg(samples: &[Sample], result: &Value) -> String {
    let (width, height, left, bottom) = (900.0, 360.0, 60.0, 40.0);
    let plot_w = width - left - 20.0;
    let plot_h = height - bottom - 30.0;
    let t_max = samples.iter().map(|s| s.t).fold(1.0_f64, f64::max);
    let x = |t: f64| left + t / t_max * plot_w;
    let series: [Series; 3] = [
        (
            "acknowledged events",
            "#1f77b4",
            Box::new(|s: &Sample| s.acked_events as f64),
        ),
        ("spool depth (events)", "#ff7f0e", Box::new(|s: &Sample| s.spool_events)),
        (
            "refused requests",
            "#d62728",
            Box::new(|s: &Sample| s.refused_requests as f64),
        ),
    ];
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif" font-size="11">"#
    );
    let _ = writeln!(out, r#"<rect width="100%" height="100%" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{left}" y="16" font-size="13">{} — each line scaled to its own maximum; shaded: a breaker open</text>"#,
        result["scenario"].as_str().unwrap_or("")
    );
    // Breaker open periods.
    for window in samples.windows(2) {
        if window[0].breakers.values().any(|v| *v == 1.0) {
            let _ = writeln!(
                out,
                r##"<rect x="{:.1}" y="30" width="{:.1}" height="{plot_h}" fill="#f2c0c0" opacity="0.5"/>"##,
                x(window[0].t),
                (x(window[1].t) - x(window[0].t)).max(0.5)
            );
        }
    }
    let _ = writeln!(
        out,
        r##"<line x1="{left}" y1="{}" x2="{}" y2="{}" stroke="#333"/>"##,
        30.0 + plot_h,
        left + plot_w,
        30.0 + plot_h
    );
    for (i, (label, color, value)) in series.iter().enumerate() {
        let max = samples.iter().map(value).fold(0.0_f64, f64::max).max(1.0);
        let points: Vec<String> = samples
            .iter()
            .map(|s| format!("{:.1},{:.1}", x(s.t), 30.0 + plot_h - value(s) / max * plot_h))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{color}" stroke-width="1.5" points="{}"/>"#,
            points.join(" ")
        );
        let _ = writeln!(
            out,
            r#"<text x="{}" y="{}" fill="{color}">{label} (max {max:.0})</text>"#,
            left + i as f64 * 260.0,
            height - 8.0
        );
    }
    for tick in 0..=5 {
        let t = t_max * tick as f64 / 5.0;
        let _ = writeln!(
            out,
            r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">{t:.0} s</text>"#,
            x(t),
            30.0 + plot_h + 14.0
        );
    }
    out.push_str("</svg>\n");
    out
}
