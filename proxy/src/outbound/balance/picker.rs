//! The load-balancing algorithms: each picks one endpoint of a set per request.
//!
//! tower's own balancer covers P2C only and owns its endpoints; here the endpoint set is a shared
//! snapshot that retries (a different endpoint next time) and outlier detection (skip ejected ones)
//! also read, so the algorithms are small functions over that snapshot.

use std::collections::hash_map::DefaultHasher;
use std::hash::{Hash, Hasher};
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use http::HeaderName;
use rand::Rng;

use crate::client::Endpoint;
use crate::policy::Algorithm;

/// Virtual nodes per endpoint on the hash ring: enough for an even spread over a few endpoints.
const RING_POINTS_PER_ENDPOINT: usize = 128;

/// How the next endpoint is picked: the algorithm with the state it keeps.
enum Picker {
    PeakEwma,
    LeastRequest,
    Random,
    RoundRobin {
        next: AtomicUsize,
    },
    ConsistentHash {
        header: HeaderName,
        /// (point, endpoint index), sorted by point.
        ring: Vec<(u64, usize)>,
    },
}

pub struct Balancer {
    picker: Picker,
    endpoints: Vec<Arc<Endpoint>>,
}

impl Balancer {
    pub fn new(algorithm: Algorithm, endpoints: Vec<Arc<Endpoint>>) -> Self {
        let picker = match algorithm {
            Algorithm::PeakEwma => Picker::PeakEwma,
            Algorithm::LeastRequest => Picker::LeastRequest,
            Algorithm::Random => Picker::Random,
            // A random start, so proxies that start together do not all begin with the same
            // endpoint.
            Algorithm::RoundRobin => Picker::RoundRobin {
                next: AtomicUsize::new(rand::rng().random::<u32>() as usize),
            },
            Algorithm::ConsistentHash { header } => Picker::ConsistentHash {
                header,
                ring: ring(&endpoints),
            },
        };
        Self { picker, endpoints }
    }

    pub fn endpoints(&self) -> &[Arc<Endpoint>] {
        &self.endpoints
    }

    /// Whether this balancer picks by `algorithm` among exactly `endpoints`, so that a new version
    /// can keep it (and its hash ring, and its place in a round).
    pub fn is_over(&self, algorithm: &Algorithm, endpoints: &[Arc<Endpoint>]) -> bool {
        let same_picker = match (&self.picker, algorithm) {
            (Picker::PeakEwma, Algorithm::PeakEwma)
            | (Picker::LeastRequest, Algorithm::LeastRequest)
            | (Picker::Random, Algorithm::Random)
            | (Picker::RoundRobin { .. }, Algorithm::RoundRobin) => true,
            (Picker::ConsistentHash { header: mine, .. }, Algorithm::ConsistentHash { header }) => {
                mine == header
            }
            _ => false,
        };
        same_picker
            && self.endpoints.len() == endpoints.len()
            && self
                .endpoints
                .iter()
                .zip(endpoints)
                .all(|(mine, theirs)| Arc::ptr_eq(mine, theirs))
    }

    /// Picks an endpoint for a request with these headers, skipping `avoid` (endpoints already
    /// tried) and any that `usable` refuses, unless nothing else is left.
    pub fn pick(
        &self,
        headers: &http::HeaderMap,
        avoid: &[SocketAddr],
        usable: impl Fn(&Endpoint) -> bool,
    ) -> Option<Arc<Endpoint>> {
        let eligible = |e: &Endpoint| !avoid.contains(&e.addr) && usable(e);
        self.pick_among(headers, &eligible)
            .or_else(|| self.pick_among(headers, &|e: &Endpoint| usable(e)))
            .or_else(|| self.pick_among(headers, &|_: &Endpoint| true))
    }

    fn pick_among(
        &self,
        headers: &http::HeaderMap,
        eligible: &dyn Fn(&Endpoint) -> bool,
    ) -> Option<Arc<Endpoint>> {
        let n = self.endpoints.len();
        if n == 0 {
            return None;
        }
        let index = match &self.picker {
            Picker::RoundRobin { next } => {
                let start = next.fetch_add(1, Ordering::Relaxed);
                (0..n)
                    .map(|offset| (start + offset) % n)
                    .find(|&i| eligible(&self.endpoints[i]))?
            }
            Picker::Random => self.random_eligible(eligible)?,
            Picker::PeakEwma => {
                self.power_of_two(eligible, |b, a| b.load.is_cheaper_than(&a.load))?
            }
            Picker::LeastRequest => {
                self.power_of_two(eligible, |b, a| b.load.in_flight() < a.load.in_flight())?
            }
            Picker::ConsistentHash { header, ring } => match headers.get(header) {
                Some(value) => {
                    let h = hash(&value.as_bytes());
                    let start = ring.partition_point(|(point, _)| *point < h);
                    (0..ring.len())
                        .map(|offset| ring[(start + offset) % ring.len()].1)
                        .find(|&i| eligible(&self.endpoints[i]))?
                }
                None => self.random_eligible(eligible)?,
            },
        };
        Some(self.endpoints[index].clone())
    }

    fn random_eligible(&self, eligible: &dyn Fn(&Endpoint) -> bool) -> Option<usize> {
        let n = self.endpoints.len();
        let start = rand::rng().random_range(0..n);
        (0..n)
            .map(|offset| (start + offset) % n)
            .find(|&i| eligible(&self.endpoints[i]))
    }

    /// Power of two choices: two random eligible endpoints, the cheaper one wins (the first
    /// drawn when neither is). Nearly as good as scanning every endpoint, at constant cost.
    fn power_of_two(
        &self,
        eligible: &dyn Fn(&Endpoint) -> bool,
        cheaper: impl Fn(&Endpoint, &Endpoint) -> bool,
    ) -> Option<usize> {
        let n = self.endpoints.len();
        let mut rng = rand::rng();
        let a = {
            let start = rng.random_range(0..n);
            (0..n)
                .map(|offset| (start + offset) % n)
                .find(|&i| eligible(&self.endpoints[i]))?
        };
        let b = {
            let start = rng.random_range(0..n);
            (0..n)
                .map(|offset| (start + offset) % n)
                .find(|&i| i != a && eligible(&self.endpoints[i]))
        };
        Some(match b {
            Some(b) if cheaper(&self.endpoints[b], &self.endpoints[a]) => b,
            _ => a,
        })
    }
}

/// The hash ring of `endpoints`: points per endpoint, sorted.
fn ring(endpoints: &[Arc<Endpoint>]) -> Vec<(u64, usize)> {
    let mut ring: Vec<(u64, usize)> = endpoints
        .iter()
        .enumerate()
        .flat_map(|(index, endpoint)| {
            (0..RING_POINTS_PER_ENDPOINT).map(move |point| (hash(&(endpoint.addr, point)), index))
        })
        .collect();
    ring.sort_unstable();
    ring
}

fn hash(value: &impl Hash) -> u64 {
    let mut hasher = DefaultHasher::new();
    value.hash(&mut hasher);
    hasher.finish()
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;
    use std::time::Duration;

    fn endpoints(n: u16) -> Vec<Arc<Endpoint>> {
        (0..n)
            .map(|i| crate::client::test_endpoint(1000 + i, &[]))
            .collect()
    }

    fn counts(
        balancer: &Balancer,
        requests: usize,
        headers: impl Fn(usize) -> http::HeaderMap,
    ) -> HashMap<SocketAddr, usize> {
        let mut counts = HashMap::new();
        for i in 0..requests {
            let picked = balancer.pick(&headers(i), &[], |_| true).unwrap();
            *counts.entry(picked.addr).or_default() += 1;
        }
        counts
    }

    #[tokio::test]
    async fn round_robin_takes_turns() {
        let balancer = Balancer::new(Algorithm::RoundRobin, endpoints(3));
        let counts = counts(&balancer, 300, |_| http::HeaderMap::new());
        assert!(counts.values().all(|&c| c == 100), "{counts:?}");
    }

    #[tokio::test]
    async fn random_spreads_evenly() {
        let balancer = Balancer::new(Algorithm::Random, endpoints(4));
        let counts = counts(&balancer, 8000, |_| http::HeaderMap::new());
        assert_eq!(counts.len(), 4);
        assert!(
            counts.values().all(|&c| (1700..2300).contains(&c)),
            "{counts:?}"
        );
    }

    #[tokio::test]
    async fn least_request_avoids_the_busy_endpoint() {
        let all = endpoints(3);
        let busy: Vec<_> = (0..10).map(|_| all[0].load.start()).collect();
        let balancer = Balancer::new(Algorithm::LeastRequest, all.clone());
        let counts = counts(&balancer, 1000, |_| http::HeaderMap::new());
        assert_eq!(counts.get(&all[0].addr), None, "{counts:?}");
        drop(busy);
    }

    #[tokio::test]
    async fn peak_ewma_prefers_the_fast_endpoint() {
        let all = endpoints(2);
        all[0].load.observe(Duration::from_millis(500));
        all[1].load.observe(Duration::from_millis(1));
        let balancer = Balancer::new(Algorithm::PeakEwma, all.clone());
        let counts = counts(&balancer, 1000, |_| http::HeaderMap::new());
        // P2C with two endpoints compares both every time.
        assert_eq!(counts.get(&all[1].addr), Some(&1000), "{counts:?}");
    }

    #[tokio::test]
    async fn peak_ewma_shares_between_equal_endpoints_when_one_has_not_answered_yet() {
        let all = endpoints(2);
        all[0].load.observe(Duration::from_millis(1));
        let balancer = Balancer::new(Algorithm::PeakEwma, all.clone());
        let counts = counts(&balancer, 1000, |_| http::HeaderMap::new());
        // The new endpoint is as good as the known fast one until it answers: about half each.
        let new = counts.get(&all[1].addr).copied().unwrap_or(0);
        assert!((300..700).contains(&new), "{counts:?}");
    }

    #[tokio::test]
    async fn peak_ewma_avoids_an_endpoint_that_only_fails() {
        let all = endpoints(3);
        all[0].load.observe(Duration::from_millis(2));
        all[1].load.observe(Duration::from_millis(2));
        all[2].load.start().failed();
        let balancer = Balancer::new(Algorithm::PeakEwma, all.clone());
        let counts = counts(&balancer, 1000, |_| http::HeaderMap::new());
        assert_eq!(counts.get(&all[2].addr), None, "{counts:?}");
    }

    #[tokio::test]
    async fn consistent_hash_is_sticky_and_moves_little_on_change() {
        let header = HeaderName::from_static("x-user");
        let algorithm = Algorithm::ConsistentHash {
            header: header.clone(),
        };
        let all = endpoints(5);
        let user = |i: usize| {
            let mut h = http::HeaderMap::new();
            h.insert(header.clone(), i.to_string().parse().unwrap());
            h
        };
        let before = Balancer::new(algorithm.clone(), all.clone());
        let after = Balancer::new(algorithm, all[..4].to_vec());
        let mut moved = 0;
        for i in 0..1000 {
            let first = before.pick(&user(i), &[], |_| true).unwrap().addr;
            assert_eq!(before.pick(&user(i), &[], |_| true).unwrap().addr, first);
            let second = after.pick(&user(i), &[], |_| true).unwrap().addr;
            if first != second {
                assert_eq!(first, all[4].addr, "a key moved off a surviving endpoint");
                moved += 1;
            }
        }
        // The removed endpoint held about a fifth of the keys; only those move.
        assert!((100..300).contains(&moved), "{moved}");
        let spread = counts(&before, 5000, user);
        assert!(
            spread.values().all(|&c| (600..1400).contains(&c)),
            "{spread:?}"
        );
    }

    #[tokio::test]
    async fn avoided_and_unusable_endpoints_are_skipped_while_others_remain() {
        let all = endpoints(3);
        for algorithm in [
            Algorithm::RoundRobin,
            Algorithm::Random,
            Algorithm::PeakEwma,
            Algorithm::LeastRequest,
            Algorithm::ConsistentHash {
                header: HeaderName::from_static("x-user"),
            },
        ] {
            let balancer = Balancer::new(algorithm, all.clone());
            for _ in 0..100 {
                let picked = balancer
                    .pick(&http::HeaderMap::new(), &[all[0].addr], |e| {
                        e.addr != all[1].addr
                    })
                    .unwrap();
                assert_eq!(picked.addr, all[2].addr);
            }
            // Nothing eligible left: still answer rather than fail.
            assert!(
                balancer
                    .pick(
                        &http::HeaderMap::new(),
                        &[all[0].addr, all[1].addr, all[2].addr],
                        |_| false
                    )
                    .is_some()
            );
        }
        assert!(
            Balancer::new(Algorithm::Random, Vec::new())
                .pick(&http::HeaderMap::new(), &[], |_| true)
                .is_none()
        );
    }
}
