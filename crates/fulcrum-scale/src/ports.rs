//! The ports local replicas listen on: a configured range, lowest free port first.
//!
//! A replica takes a port when it is first started and keeps it through its restarts (its
//! address, as the proxy knows it, does not change); the port is free again once the replica
//! was stopped and its process is gone. The pool does not probe the ports: one that another
//! program holds shows up as a replica that crashes at start (its bind is refused), is
//! restarted with backoff and, if the port stays taken, given up.
//!
//! ```
//! use fulcrum_scale::ports::{PortPool, PortRange};
//!
//! let mut pool = PortPool::new("9100-9102".parse::<PortRange>().unwrap());
//! assert_eq!(pool.take(), Some(9100));
//! assert_eq!(pool.take(), Some(9101));
//! pool.release(9100);
//! assert_eq!(pool.take(), Some(9100)); // lowest first
//! assert_eq!(pool.free(), 1);
//! ```

use std::collections::BTreeSet;
use std::fmt;
use std::str::FromStr;

/// A range of ports, both ends included, written `9100-9199` (or a single port, `9100`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct PortRange {
    first: u16,
    last: u16,
}

/// A port range refused by [`PortRange::try_new`] or its parser.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum PortRangeError {
    /// Not `FIRST-LAST` or a single port.
    #[error("expected a port range such as 9100-9199, got {0:?}")]
    Syntax(String),
    /// Port 0 cannot be given to a replica: it would bind some other port.
    #[error("port 0 is not allowed in a replica port range")]
    Zero,
    /// The first port is above the last.
    #[error("the range {first}-{last} is empty: its first port is above its last")]
    Backwards {
        /// The first port as written.
        first: u16,
        /// The last port as written.
        last: u16,
    },
}

// === impl PortRange ===

impl PortRange {
    /// The ports `first..=last`; neither may be 0.
    pub fn try_new(first: u16, last: u16) -> Result<Self, PortRangeError> {
        if first == 0 {
            return Err(PortRangeError::Zero);
        }
        if first > last {
            return Err(PortRangeError::Backwards { first, last });
        }
        Ok(PortRange { first, last })
    }

    /// The first port.
    pub fn first(&self) -> u16 {
        self.first
    }

    /// The last port.
    pub fn last(&self) -> u16 {
        self.last
    }

    /// How many ports the range holds.
    pub fn len(&self) -> u32 {
        u32::from(self.last - self.first) + 1
    }

    /// Never true: a range holds at least one port.
    pub fn is_empty(&self) -> bool {
        false
    }
}

impl FromStr for PortRange {
    type Err = PortRangeError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let syntax = || PortRangeError::Syntax(s.to_owned());
        let port = |p: &str| p.trim().parse::<u16>().map_err(|_| syntax());
        match s.split_once('-') {
            Some((first, last)) => PortRange::try_new(port(first)?, port(last)?),
            None => {
                let p = port(s)?;
                PortRange::try_new(p, p)
            }
        }
    }
}

impl fmt::Display for PortRange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}-{}", self.first, self.last)
    }
}

/// The ports of a range not given to a replica; see the [module](self) docs.
#[derive(Clone, Debug)]
pub struct PortPool {
    range: PortRange,
    taken: BTreeSet<u16>,
}

// === impl PortPool ===

impl PortPool {
    /// Every port of `range` free.
    pub fn new(range: PortRange) -> Self {
        PortPool { range, taken: BTreeSet::new() }
    }

    /// The range.
    pub fn range(&self) -> PortRange {
        self.range
    }

    /// The lowest free port, now taken; `None` when every port is taken.
    pub fn take(&mut self) -> Option<u16> {
        let port = (self.range.first..=self.range.last).find(|p| !self.taken.contains(p))?;
        self.taken.insert(port);
        Some(port)
    }

    /// Gives a port back (a port not taken, or outside the range, is ignored).
    pub fn release(&mut self, port: u16) {
        self.taken.remove(&port);
    }

    /// How many ports are free.
    pub fn free(&self) -> u32 {
        self.range.len() - u32::try_from(self.taken.len()).unwrap_or(u32::MAX).min(self.range.len())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ranges() {
        assert_eq!("9100-9199".parse(), PortRange::try_new(9100, 9199));
        assert_eq!(" 9100 - 9100 ".parse::<PortRange>().unwrap().len(), 1);
        assert_eq!("8080".parse::<PortRange>().unwrap().to_string(), "8080-8080");
        assert_eq!("1-65535".parse::<PortRange>().unwrap().len(), 65535);
        assert_eq!("0-10".parse::<PortRange>(), Err(PortRangeError::Zero));
        assert_eq!("20-10".parse::<PortRange>(), Err(PortRangeError::Backwards { first: 20, last: 10 }));
        assert!(matches!("a-b".parse::<PortRange>(), Err(PortRangeError::Syntax(_))));
        assert!(matches!("9100-70000".parse::<PortRange>(), Err(PortRangeError::Syntax(_))));
        assert!(matches!("".parse::<PortRange>(), Err(PortRangeError::Syntax(_))));
    }

    #[test]
    fn takes_lowest_free_and_runs_out() {
        let mut pool = PortPool::new(PortRange::try_new(10, 12).unwrap());
        assert_eq!((pool.take(), pool.take(), pool.take(), pool.take()), (Some(10), Some(11), Some(12), None));
        assert_eq!(pool.free(), 0);
        pool.release(11);
        pool.release(11);
        pool.release(5000);
        assert_eq!(pool.free(), 1);
        assert_eq!(pool.take(), Some(11));
        pool.release(12);
        pool.release(10);
        assert_eq!(pool.take(), Some(10));
    }
}
