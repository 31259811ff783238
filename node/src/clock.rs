//! Wall-clock time in Unix seconds: descriptor validity and key ages are absolute times that
//! must mean the same on every node.

/// Seconds since the Unix epoch (0 if the clock is set before 1970).
#[must_use]
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}
