//! Issue 15's performance targets, judged in the bench output beside the figures they
//! come from (ours against virtio-drivers in the same run; `docs/benchmarks.md`).

/// One target: a ratio of two medians of this run and the bound it must reach.
pub struct Target {
    /// What is compared, and which way round the ratio is taken.
    pub what: &'static str,
    /// NaN when a figure is missing (not met).
    pub ratio: f64,
    pub bound: f64,
    /// The ratio must be at most `bound` (costs) or, when false, at least `bound` (speeds).
    pub at_most: bool,
}

impl Target {
    /// Judged on the ratio itself, not on its rounding.
    pub fn met(&self) -> bool {
        self.ratio.is_finite()
            && if self.at_most {
                self.ratio <= self.bound
            } else {
                self.ratio >= self.bound
            }
    }
}

/// Prints one line per target under a heading saying what the ratios are of (`basis`),
/// and returns "N of M targets met" for the verdict line.
pub fn report(basis: &str, targets: &[Target]) -> String {
    println!("\ntargets of issue 15 ({basis}; 3 decimals, judged unrounded):\n");
    let width = targets.iter().map(|t| t.what.len()).max().unwrap_or(0);
    for t in targets {
        let ratio = if t.ratio.is_finite() {
            format!("{:.3}", t.ratio)
        } else {
            "—".into()
        };
        println!(
            "  {:width$}  {ratio:>6}  target {} {:.2}: {}",
            t.what,
            if t.at_most { "≤" } else { "≥" },
            t.bound,
            if t.met() { "met" } else { "NOT met" },
        );
    }
    let met = targets.iter().filter(|t| t.met()).count();
    format!("{met} of {} targets met", targets.len())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_target_is_judged_on_the_unrounded_ratio_and_missing_figures_fail() {
        let cost = |ratio| Target {
            what: "cost",
            ratio,
            bound: 0.7,
            at_most: true,
        };
        assert!(cost(0.7).met() && cost(0.69).met());
        assert!(!cost(0.7004).met(), "0.7004 prints as 0.70 but is over 0.7");
        assert!(!cost(f64::NAN).met());
        let speed = Target {
            what: "speed",
            ratio: 2.49,
            bound: 2.5,
            at_most: false,
        };
        assert!(!speed.met());
        assert_eq!(report("test", &[cost(0.5), speed]), "1 of 2 targets met");
    }
}
