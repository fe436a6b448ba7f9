//! The prices a lease was granted under, kept on disk with it.
//!
//! A worker admits requests under a lease by the prices in force at grant, and the ledger charges
//! them at those prices. `models.reload` voids leases (their epoch changes), but a lease open
//! when the daemon restarts with other prices in models.toml must still be charged at the grant's:
//! each catalog's prices are stored once in `price_lists` under a content id, and a lease's row
//! names its list (in the `model` column, which a lease has no other use for).

use std::collections::BTreeMap;

use sha2::{Digest, Sha256};

use crate::config::{Catalog, ModelDef};
use crate::money::Prices;

/// A catalog's prices as stored: `{"model": [input, output, cached_input or null], ...}` in µUSD
/// per 1M tokens, priced models only, ordered by name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceList {
    /// Hex SHA-256 of `json`: equal prices, equal id.
    pub id: String,
    pub json: String,
}

impl PriceList {
    pub fn of(catalog: &Catalog) -> Self {
        let prices: BTreeMap<&str, (u64, u64, Option<u64>)> = catalog
            .models
            .iter()
            .filter_map(|(name, m)| {
                m.prices
                    .map(|p| (name.as_str(), (p.input, p.output, p.cached_input)))
            })
            .collect();
        let json = serde_json::to_string(&prices).unwrap_or_else(|_| "{}".into());
        let id = hex::encode(Sha256::digest(json.as_bytes()));
        PriceList { id, json }
    }

    /// A catalog holding only these prices: what settling under a lease reads. `None` if the
    /// stored text is not a price list.
    pub fn catalog(json: &str) -> Option<Catalog> {
        let prices: BTreeMap<String, (u64, u64, Option<u64>)> = serde_json::from_str(json).ok()?;
        let models = prices
            .into_iter()
            .map(|(name, (input, output, cached_input))| {
                let def = ModelDef {
                    name: name.clone(),
                    provider: String::new(),
                    upstream_model: name.clone(),
                    prices: Some(Prices {
                        input,
                        output,
                        cached_input,
                    }),
                    max_output_tokens: 0,
                    context_window: 0,
                    chat_cap_field: String::new(),
                };
                (name, def)
            })
            .collect();
        Some(Catalog {
            providers: BTreeMap::new(),
            models,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::DEFAULT_MODELS_TOML;

    #[test]
    fn a_price_list_round_trips_and_its_id_follows_the_prices() {
        let catalog = Catalog::parse(DEFAULT_MODELS_TOML, "models.toml").unwrap();
        let list = PriceList::of(&catalog);
        let back = PriceList::catalog(&list.json).unwrap();
        let priced: Vec<_> = catalog
            .models
            .values()
            .filter(|m| m.prices.is_some())
            .collect();
        assert!(!priced.is_empty());
        assert_eq!(back.models.len(), priced.len());
        for m in priced {
            assert_eq!(back.models[&m.name].prices, m.prices, "{}", m.name);
        }
        assert_eq!(
            PriceList::of(&back),
            list,
            "the same prices give the same list and id"
        );

        let mut dearer = catalog.clone();
        let m = dearer
            .models
            .values_mut()
            .find(|m| m.prices.is_some())
            .unwrap();
        m.prices = m.prices.map(|p| Prices {
            input: p.input + 1,
            ..p
        });
        assert_ne!(PriceList::of(&dearer).id, list.id);
        // Anything but prices (providers, caps) leaves the list as it was.
        let mut other = catalog.clone();
        other
            .models
            .values_mut()
            .for_each(|m| m.max_output_tokens += 1);
        assert_eq!(PriceList::of(&other), list);
        assert_eq!(PriceList::catalog("not json"), None);
    }
}
