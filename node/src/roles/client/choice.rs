//! Which exit takes a request: no I/O, the randomness injected. Random among the healthy,
//! corroborated exits that serve the model (power of two random choices), with latency used
//! only to avoid exits much slower than the rest, never to rank fast ones: an exit that wins
//! by being fast (or by looking fast while unmeasured) is an exit an attacker can make win.

use std::time::Duration;

/// An exit is slow, and loses a pairing against one that is not, above this many times the
/// median latency estimate (plus [`SLOW_MARGIN`], so loopback noise never counts as slow).
pub(crate) const SLOW_FACTOR: u32 = 3;
/// See [`SLOW_FACTOR`].
pub(crate) const SLOW_MARGIN: Duration = Duration::from_millis(100);

/// A source of uniform random indices.
pub(crate) trait Random {
    /// A uniformly random number in `0..n` (`n > 0`).
    fn below(&mut self, n: usize) -> usize;
}

/// The thread's cryptographically seeded generator: which exit a client picks must not be
/// predictable to anyone who wants to steer it.
#[derive(Debug, Default, Clone, Copy)]
pub(crate) struct ThreadRandom;

impl Random for ThreadRandom {
    fn below(&mut self, n: usize) -> usize {
        rand::random_range(0..n.max(1))
    }
}

/// What the choice knows about one exit.
#[derive(Debug, Clone)]
pub(crate) struct Candidate<Id> {
    /// The exit.
    pub(crate) id: Id,
    /// Vouched for by at least two independent sources (or pinned by the user).
    pub(crate) corroborated: bool,
    /// Lists the requested model, or lists no models at all (unknown).
    pub(crate) serves_model: bool,
    /// Backing off after failures.
    pub(crate) backed_off: bool,
    /// Smoothed time to the exit's first answer byte; `None` while unmeasured.
    pub(crate) latency: Option<Duration>,
}

/// Picks an exit among `candidates`, or `None` when there are none.
///
/// In order: corroborated exits when there are any; of those, the ones that serve the model
/// (when none does, any: the backend may know it by another name); of those, the healthy
/// ones (when all back off, all: trying beats failing unasked). Among those, two distinct exits are drawn at random;
/// if exactly one of them is slow (its estimate above [`SLOW_FACTOR`] × the median + margin,
/// unmeasured exits counting as the median), the other wins, otherwise a coin decides. A fast
/// exit thus gets its uniform share and no more; a slow one gets less.
pub(crate) fn choose<Id: Clone>(
    candidates: &[Candidate<Id>],
    random: &mut impl Random,
) -> Option<Id> {
    let all: Vec<&Candidate<Id>> = candidates.iter().collect();
    // Corroboration first: health must not be a lever, or a relay that fails the honest
    // exits' requests would push clients onto an exit only it vouches for.
    let pool = narrow(all, |c| c.corroborated);
    let pool = narrow(pool, |c| c.serves_model);
    let pool = narrow(pool, |c| !c.backed_off);
    match pool.len() {
        0 => None,
        1 => Some(pool[0].id.clone()),
        n => {
            let first = random.below(n);
            let second = (first + 1 + random.below(n - 1)) % n;
            let median = median(pool.iter().filter_map(|c| c.latency));
            let slow = |c: &Candidate<Id>| {
                let estimate = c.latency.or(median).unwrap_or_default();
                median.is_some_and(|m| estimate > m * SLOW_FACTOR + SLOW_MARGIN)
            };
            let winner = match (slow(pool[first]), slow(pool[second])) {
                (true, false) => second,
                (false, true) => first,
                _ if random.below(2) == 0 => first,
                _ => second,
            };
            Some(pool[winner].id.clone())
        }
    }
}

/// The candidates that pass `keep`, or all of them when none does.
fn narrow<Id>(
    pool: Vec<&Candidate<Id>>,
    keep: impl Fn(&Candidate<Id>) -> bool,
) -> Vec<&Candidate<Id>> {
    if pool.iter().any(|c| keep(c)) {
        pool.into_iter().filter(|c| keep(c)).collect()
    } else {
        pool
    }
}

/// The median of the measured latencies (for an even count, the mean of the middle two: with
/// two exits neither is the outlier).
fn median(latencies: impl Iterator<Item = Duration>) -> Option<Duration> {
    let mut sorted: Vec<Duration> = latencies.collect();
    sorted.sort_unstable();
    let upper = sorted.len() / 2;
    let lower = sorted.len().checked_sub(1)? / 2;
    Some((sorted[lower] + sorted[upper]) / 2)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A seeded generator (SplitMix64), so a statistical test is reproducible.
    struct Seeded(u64);

    impl Random for Seeded {
        fn below(&mut self, n: usize) -> usize {
            self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = self.0;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^= z >> 31;
            usize::try_from(z % n as u64).unwrap()
        }
    }

    fn exit(id: usize, latency_ms: Option<u64>) -> Candidate<usize> {
        Candidate {
            id,
            corroborated: true,
            serves_model: true,
            backed_off: false,
            latency: latency_ms.map(Duration::from_millis),
        }
    }

    fn shares(candidates: &[Candidate<usize>], draws: usize, seed: u64) -> Vec<f64> {
        let mut random = Seeded(seed);
        let mut counts = vec![0usize; candidates.len()];
        for _ in 0..draws {
            counts[choose(candidates, &mut random).unwrap()] += 1;
        }
        counts.iter().map(|c| *c as f64 / draws as f64).collect()
    }

    #[test]
    fn a_fast_newcomer_gets_its_fair_share_not_all() {
        for honest in [1usize, 3, 5, 9] {
            // Honest exits answer in about 100 ms; the newcomer (last) in 5 ms.
            let mut candidates: Vec<_> = (0..honest)
                .map(|i| exit(i, Some(90 + 5 * i as u64)))
                .collect();
            candidates.push(exit(honest, Some(5)));
            let draws = 20_000;
            let share = shares(&candidates, draws, honest as u64)[honest];
            let fair = 1.0 / (honest + 1) as f64;
            // Five standard deviations of a binomial share.
            let tolerance = 5.0 * (fair * (1.0 - fair) / draws as f64).sqrt();
            assert!(
                (share - fair).abs() < tolerance,
                "{honest} honest: newcomer share {share:.3}, fair {fair:.3}"
            );
        }
    }

    #[test]
    fn an_unmeasured_newcomer_counts_as_the_median() {
        let mut candidates: Vec<_> = (0..3).map(|i| exit(i, Some(100))).collect();
        candidates.push(exit(3, None));
        let share = shares(&candidates, 20_000, 7)[3];
        assert!((share - 0.25).abs() < 0.02, "share {share}");
    }

    #[test]
    fn a_slow_exit_loses_every_pairing() {
        let mut candidates: Vec<_> = (0..3).map(|i| exit(i, Some(100))).collect();
        candidates.push(exit(3, Some(2_000)));
        let share = shares(&candidates, 10_000, 3);
        assert!(share[3] < 0.001, "slow exit share {}", share[3]);
        for fair in &share[..3] {
            assert!((fair - 1.0 / 3.0).abs() < 0.03, "{share:?}");
        }
    }

    #[test]
    fn backed_off_single_sourced_and_other_model_exits_are_avoided_while_others_exist() {
        let mut random = Seeded(1);
        let mut backed_off = exit(0, Some(10));
        backed_off.backed_off = true;
        let mut single = exit(1, Some(10));
        single.corroborated = false;
        let mut other_model = exit(2, Some(10));
        other_model.serves_model = false;
        let good = exit(3, Some(500));
        let all = [
            backed_off.clone(),
            single.clone(),
            other_model.clone(),
            good,
        ];
        for _ in 0..200 {
            assert_eq!(choose(&all, &mut random), Some(3));
        }
        // A relay that fails the corroborated exits' requests does not push clients onto an
        // exit only it vouches for.
        assert_eq!(
            choose(&[backed_off.clone(), single.clone()], &mut random),
            Some(0)
        );
        // Nothing better: each is used rather than none.
        assert_eq!(choose(&[backed_off], &mut random), Some(0));
        assert_eq!(choose(&[single], &mut random), Some(1));
        assert_eq!(choose(&[other_model], &mut random), Some(2));
        assert_eq!(choose::<usize>(&[], &mut random), None);
    }

    #[test]
    fn median_of_measured_latencies() {
        let ms = Duration::from_millis;
        assert_eq!(median([ms(3), ms(1), ms(2)].into_iter()), Some(ms(2)));
        assert_eq!(median([ms(4), ms(2)].into_iter()), Some(ms(3)));
        assert_eq!(median(std::iter::empty()), None);
    }
}
