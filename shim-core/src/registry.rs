//! Link-time plugin registries (Go's `init()` in Rust): plugin crates `inventory::submit!` a
//! const entry, and core collects, sorts and checks them.
//!
//! ```no_run
//! use std::sync::Arc;
//! use shim_core::{ShimletContext, ShimletEntry, ShimletError, Shimlet};
//! # use shim_core::testing::InstantShimlet as MyShimlet;
//! fn build(_ctx: ShimletContext) -> futures::future::BoxFuture<'static, Result<Arc<dyn Shimlet>, ShimletError>> {
//!     Box::pin(async { Ok(Arc::new(MyShimlet::default()) as Arc<dyn Shimlet>) })
//! }
//! shim_core::inventory::submit! { ShimletEntry::new("mine", "my runtime", build) }
//! ```

use std::collections::BTreeMap;
use std::sync::Arc;

use futures::future::BoxFuture;

use crate::config::PluginSettings;
use crate::error::{Error, Result};
use crate::pipeline::Pipeline;
use crate::shimlet::{Shimlet, ShimletContext, ShimletError};

/// Builds a shimlet (async: it may connect to a runtime first).
pub type ShimletFactory =
    fn(ShimletContext) -> BoxFuture<'static, Result<Arc<dyn Shimlet>, ShimletError>>;
/// Builds a pipeline from the configuration.
pub type PipelineFactory = fn(&PluginSettings) -> Result<Pipeline, String>;

/// A registered runtime.
#[derive(Debug)]
pub struct ShimletEntry {
    /// Name chosen with `--shimlet`.
    pub name: &'static str,
    /// One line for `plugins` listings.
    pub description: &'static str,
    /// Constructor.
    pub factory: ShimletFactory,
}

impl ShimletEntry {
    /// An entry for `inventory::submit!`.
    pub const fn new(
        name: &'static str,
        description: &'static str,
        factory: ShimletFactory,
    ) -> Self {
        Self {
            name,
            description,
            factory,
        }
    }
}

/// A registered pipeline.
#[derive(Debug)]
pub struct PipelineEntry {
    /// Name chosen with `--pipeline`.
    pub name: &'static str,
    /// One line for `plugins` listings.
    pub description: &'static str,
    /// Constructor.
    pub factory: PipelineFactory,
}

impl PipelineEntry {
    /// An entry for `inventory::submit!`.
    pub const fn new(
        name: &'static str,
        description: &'static str,
        factory: PipelineFactory,
    ) -> Self {
        Self {
            name,
            description,
            factory,
        }
    }
}

inventory::collect!(ShimletEntry);
inventory::collect!(PipelineEntry);

/// Every registered shimlet, sorted by name.
///
/// # Errors
/// [`Error::DuplicatePlugin`] when two crates registered one name.
pub fn shimlets() -> Result<Vec<&'static ShimletEntry>> {
    sorted_unique(
        "shimlet",
        inventory::iter::<ShimletEntry>
            .into_iter()
            .map(|e| (e.name, e)),
    )
}

/// Every registered pipeline, sorted by name.
///
/// # Errors
/// [`Error::DuplicatePlugin`] when two crates registered one name.
pub fn pipelines() -> Result<Vec<&'static PipelineEntry>> {
    sorted_unique(
        "pipeline",
        inventory::iter::<PipelineEntry>
            .into_iter()
            .map(|e| (e.name, e)),
    )
}

/// The shimlet called `name`.
///
/// # Errors
/// [`Error::UnknownPlugin`] listing the known names, or a duplicate error.
pub fn shimlet(name: &str) -> Result<&'static ShimletEntry> {
    let all = shimlets()?;
    find("shimlet", name, all.iter().map(|e| (e.name, *e)))
}

/// The pipeline called `name`.
///
/// # Errors
/// [`Error::UnknownPlugin`] listing the known names, or a duplicate error.
pub fn pipeline(name: &str) -> Result<&'static PipelineEntry> {
    let all = pipelines()?;
    find("pipeline", name, all.iter().map(|e| (e.name, *e)))
}

fn sorted_unique<T>(
    kind: &'static str,
    entries: impl Iterator<Item = (&'static str, T)>,
) -> Result<Vec<T>> {
    let mut by_name = BTreeMap::new();
    for (name, entry) in entries {
        if by_name.insert(name, entry).is_some() {
            return Err(Error::DuplicatePlugin {
                kind,
                name: name.to_string(),
            });
        }
    }
    Ok(by_name.into_values().collect())
}

fn find<T>(
    kind: &'static str,
    name: &str,
    entries: impl Iterator<Item = (&'static str, T)>,
) -> Result<T> {
    let mut known = Vec::new();
    for (entry_name, entry) in entries {
        if entry_name == name {
            return Ok(entry);
        }
        known.push(entry_name);
    }
    let known = if known.is_empty() {
        "none".to_string()
    } else {
        known.join(", ")
    };
    Err(Error::UnknownPlugin {
        kind,
        name: name.to_string(),
        known,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn duplicates_are_an_error_and_listing_is_sorted() {
        let ok = sorted_unique("shimlet", [("process", 1), ("docker", 2)].into_iter()).unwrap();
        assert_eq!(ok, [2, 1]);
        let dup =
            sorted_unique("shimlet", [("process", 1), ("process", 2)].into_iter()).unwrap_err();
        assert_eq!(dup.to_string(), "shimlet \"process\" is registered twice");
    }

    #[test]
    fn an_unknown_name_lists_the_known_ones() {
        let err = find(
            "shimlet",
            "k9s",
            [("docker", 1), ("process", 2)].into_iter(),
        )
        .unwrap_err();
        assert_eq!(
            err.to_string(),
            "unknown shimlet \"k9s\"; known shimlets: docker, process"
        );
    }
}
