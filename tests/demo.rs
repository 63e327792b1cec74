//! `lb demo`, as a newcomer runs it: no root, no configuration. It must succeed and show the
//! paper's two effects: asymmetric returns rescued (Fig. 1) and repeat downloads kept small
//! by dictionary affinity but not by a 5-tuple hash (Fig. 2).

use std::process::Command;

const LB: &str = env!("CARGO_BIN_EXE_lb");

/// The two percentages of a Fig. 2 result line ("  affinity   100.3%   0.3%   60 / 36 / 48").
fn percents(line: &str) -> (f64, f64) {
    let p: Vec<f64> = line.split_whitespace().filter_map(|w| w.strip_suffix('%')?.parse().ok()).collect();
    assert_eq!(p.len(), 2, "{line}");
    (p[0], p[1])
}

#[test]
fn demo_shows_fig1_rescues_and_fig2_savings_with_and_without_affinity() {
    let out = Command::new(LB).args(["demo", "--connections", "300"]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "lb demo failed:\n{text}\n{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("all databases converged"), "{text}");
    assert!(text.contains("rescued at the owner"), "{text}");
    let line = |start: &str| {
        text.lines().find(|l| l.trim_start().starts_with(start)).unwrap_or_else(|| panic!("no {start} line:\n{text}"))
    };
    let (hash_first, hash_repeat) = percents(line("5-tuple hash"));
    let (aff_first, aff_repeat) = percents(line("affinity  "));
    // First rounds cannot be saved; the codec adds a little framing.
    assert!(hash_first > 95.0 && aff_first > 95.0, "{text}");
    assert!(aff_repeat <= 5.0, "affinity repeats cost {aff_repeat}%:\n{text}");
    assert!(hash_repeat > 20.0 && hash_repeat > 4.0 * aff_repeat, "{text}");
    assert!(line("affinity decisions:").contains("affinity "), "{text}");
    assert!(text.contains("DICT_STATS ADVERTISE"), "statistics crossed the control channels:\n{text}");
}
