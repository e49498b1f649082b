//! Passive outlier detection: endpoints that fail repeatedly are ejected
//! for a while, longer each time, as Envoy does.

use std::time::Duration;

/// When to eject an endpoint and for how long.
#[derive(Debug, Clone)]
pub struct OutlierDetection {
    /// Consecutive failures (connect errors, UNAVAILABLE, 502/503/504) that
    /// eject an endpoint. 0 disables ejection. Default: 5.
    pub consecutive_failures: u32,
    /// The first ejection's length; the n-th lasts n times as long. Default: 5 s.
    pub base_ejection: Duration,
    /// The longest ejection. Default: 5 min.
    pub max_ejection: Duration,
    /// Never eject more than this share of the set (percent). Default: 50.
    pub max_ejection_percent: u8,
}

impl Default for OutlierDetection {
    fn default() -> Self {
        OutlierDetection {
            consecutive_failures: 5,
            base_ejection: Duration::from_secs(5),
            max_ejection: Duration::from_secs(300),
            max_ejection_percent: 50,
        }
    }
}

impl OutlierDetection {
    /// Whether one more ejection keeps the ejected share within the limit.
    pub(crate) fn may_eject(&self, ejected: usize, total: usize) -> bool {
        total > 0 && (ejected + 1) * 100 <= total * usize::from(self.max_ejection_percent)
    }
}
