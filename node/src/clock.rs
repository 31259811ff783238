//! Wall-clock time: descriptor validity, key ages and request dates are absolute times that
//! must mean the same on every node. [`Clock`] lets tests move an exit's time (a request
//! replayed minutes later) without waiting.

use std::{
    fmt,
    sync::Arc,
    time::{Duration, SystemTime},
};

/// Seconds since the Unix epoch (0 if the clock is set before 1970).
#[must_use]
pub fn unix_now() -> u64 {
    unix_secs(SystemTime::now())
}

/// `time` in seconds since the Unix epoch (0 before 1970).
#[must_use]
pub fn unix_secs(time: SystemTime) -> u64 {
    time.duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// A source of wall-clock time: the system's, or one a test controls.
#[derive(Clone)]
pub struct Clock(Arc<dyn Fn() -> SystemTime + Send + Sync>);

impl Clock {
    /// The system clock.
    #[must_use]
    pub fn system() -> Self {
        Self(Arc::new(SystemTime::now))
    }

    /// A clock that reads `now`.
    #[must_use]
    pub fn from_fn(now: impl Fn() -> SystemTime + Send + Sync + 'static) -> Self {
        Self(Arc::new(now))
    }

    /// The system clock moved by `offset()` seconds forward, read at each call (tests advance
    /// it while the node runs).
    #[must_use]
    pub fn offset(offset: Arc<std::sync::atomic::AtomicU64>) -> Self {
        Self::from_fn(move || {
            SystemTime::now()
                + Duration::from_secs(offset.load(std::sync::atomic::Ordering::SeqCst))
        })
    }

    /// The time now.
    #[must_use]
    pub fn now(&self) -> SystemTime {
        (self.0)()
    }

    /// The time now in Unix seconds.
    #[must_use]
    pub fn unix_now(&self) -> u64 {
        unix_secs(self.now())
    }
}

impl Default for Clock {
    fn default() -> Self {
        Self::system()
    }
}

impl fmt::Debug for Clock {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_tuple("Clock").field(&self.now()).finish()
    }
}
