//! Canary split: a weighted choice between subsets, each balanced on its own. A weight of 0 gets
//! nothing; a subset with no available endpoint gets nothing while another weighted subset has
//! one (failover).

use std::sync::Arc;

use http::Request;
use rand::Rng;

use crate::ctx::ChosenSubset;
use crate::http::body::Body;
use crate::metrics::Name;
use crate::outbound::balance::Balance;
use crate::outbound::stack::{Leaf, ResponseFuture};

pub struct WeightedBalance {
    pub subset: Name,
    pub weight: u32,
    pub balance: Balance,
}

#[derive(Clone)]
pub enum Split {
    /// No split: every endpoint, whatever its subset.
    All(Balance),
    Weighted(Arc<[WeightedBalance]>),
}

/// Picks by weight among `candidates`.
fn weighted_choice<'a>(candidates: &[&'a WeightedBalance]) -> Option<&'a WeightedBalance> {
    let total: u64 = candidates.iter().map(|c| u64::from(c.weight)).sum();
    if total == 0 {
        return None;
    }
    let mut point = rand::rng().random_range(0..total);
    for candidate in candidates {
        let weight = u64::from(candidate.weight);
        if point < weight {
            return Some(candidate);
        }
        point -= weight;
    }
    None
}

impl Split {
    fn choose(subsets: &[WeightedBalance]) -> Option<&WeightedBalance> {
        let weighted: Vec<&WeightedBalance> = subsets.iter().filter(|s| s.weight > 0).collect();
        let available: Vec<&WeightedBalance> = weighted
            .iter()
            .copied()
            .filter(|s| s.balance.has_available())
            .collect();
        weighted_choice(&available).or_else(|| weighted_choice(&weighted))
    }
}

impl Leaf for Split {
    fn name(&self) -> &'static str {
        "split"
    }

    fn call(&self, request: Request<Body>) -> ResponseFuture {
        match self {
            Split::All(balance) => balance.call(request),
            Split::Weighted(subsets) => {
                let chosen = Self::choose(subsets).expect("validated: some weight is above 0");
                let subset = ChosenSubset(chosen.subset.clone());
                let response = chosen.balance.call(request);
                Box::pin(async move {
                    let mut response = response.await?;
                    response.extensions_mut().insert(subset);
                    Ok(response)
                })
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outbound::balance::Balancer;
    use crate::policy::Algorithm;

    fn subset(name: &str, weight: u32, endpoints: usize) -> WeightedBalance {
        let endpoints = (0..endpoints)
            .map(|i| crate::client::test_endpoint(3000 + i as u16, &[name]))
            .collect();
        WeightedBalance {
            subset: Arc::new(name.to_string()),
            weight,
            balance: Balance::new(
                name.into(),
                Arc::new(Balancer::new(Algorithm::RoundRobin, endpoints)),
                None,
            ),
        }
    }

    fn shares(subsets: &[WeightedBalance], n: usize) -> std::collections::HashMap<String, usize> {
        let mut counts = std::collections::HashMap::new();
        for _ in 0..n {
            let chosen = Split::choose(subsets).unwrap();
            *counts.entry(chosen.subset.to_string()).or_default() += 1;
        }
        counts
    }

    #[tokio::test]
    async fn weights_set_the_shares_and_zero_gets_nothing() {
        let subsets = [
            subset("stable", 90, 2),
            subset("canary", 10, 2),
            subset("off", 0, 2),
        ];
        let counts = shares(&subsets, 20_000);
        let canary = counts["canary"] as f64 / 20_000.0;
        assert!((canary - 0.10).abs() < 0.015, "{counts:?}");
        assert_eq!(counts.get("off"), None);
    }

    #[tokio::test]
    async fn a_subset_without_endpoints_fails_over_to_the_others() {
        let subsets = [
            subset("stable", 90, 0),
            subset("canary", 10, 1),
            subset("off", 0, 1),
        ];
        assert_eq!(
            shares(&subsets, 1000),
            [("canary".to_string(), 1000)].into()
        );
    }
}
