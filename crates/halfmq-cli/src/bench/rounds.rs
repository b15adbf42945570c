//! Same-run comparisons: a baseline and the thing measured, alternating, with the median
//! round reported. The embedded comparisons (transactions and idempotency keys against
//! plain sends, the raw disk against the store), the network one and the consumers' one
//! against the raw disk's fdatasync rate use it.

use halfmq::Result;

use super::report::{round3, BenchReport};
use super::BenchOptions;

/// A report whose rate a round compares with its baseline's, and which lists the rounds'
/// ratios.
pub(super) trait RoundReport {
    /// The measured rate (the numerator of the round's ratio).
    fn rate(&self) -> f64;
    /// Record every round's ratio, in the order run.
    fn set_round_ratios(&mut self, ratios: Vec<f64>);
}

impl RoundReport for BenchReport {
    fn rate(&self) -> f64 {
        self.msgs_per_s
    }

    fn set_round_ratios(&mut self, ratios: Vec<f64>) {
        self.round_ratios = ratios;
    }
}

/// Run `one_round` (which measures a baseline, then the thing measured, and returns the
/// baseline's msgs/s and the measured report) `opts.rounds` times. Returns the median
/// round's ratio (the lower one for an even count), its baseline msgs/s and its report,
/// which lists every round's ratio in the order run. `one_round` gets the round number and
/// a tag for progress lines.
pub(super) fn alternate_rounds(
    opts: &BenchOptions,
    progress: &mut dyn FnMut(&str),
    one_round: impl FnMut(u32, &str, &mut dyn FnMut(&str)) -> Result<(f64, BenchReport)>,
) -> Result<(f64, f64, BenchReport)> {
    median_round(opts.rounds, progress, one_round)
}

/// [`alternate_rounds`] for any report, `rounds` times: `one_round` returns the baseline's
/// rate and the report whose [`RoundReport::rate`] is compared with it.
pub(super) fn median_round<R: RoundReport>(
    rounds: u32,
    progress: &mut dyn FnMut(&str),
    mut one_round: impl FnMut(u32, &str, &mut dyn FnMut(&str)) -> Result<(f64, R)>,
) -> Result<(f64, f64, R)> {
    let rounds = rounds.max(1);
    let mut done: Vec<(f64, f64, R)> = Vec::new();
    for round in 1..=rounds {
        let tag = if rounds > 1 {
            format!(" (round {round} of {rounds})")
        } else {
            String::new()
        };
        let (base, r) = one_round(round, &tag, progress)?;
        let ratio = round3(r.rate() / base.max(f64::MIN_POSITIVE));
        progress(&format!("round {round}: ratio {ratio:.3}"));
        done.push((ratio, base, r));
    }
    let ratios: Vec<f64> = done.iter().map(|(ratio, _, _)| *ratio).collect();
    done.sort_by(|a, b| a.0.total_cmp(&b.0));
    // `rounds >= 1`, so `done` has at least one round.
    let (ratio, base, mut r) = done.swap_remove((done.len() - 1) / 2);
    r.set_round_ratios(ratios);
    Ok((ratio, base, r))
}
