//! The plugin crates linked into this binary. Each `use` keeps a crate's `inventory::submit!`
//! entries from being dropped by the linker; add a line here to ship another shimlet or pipeline.

use shim_pipeline as _;
use shim_shimlet_docker as _;
use shim_shimlet_k8s as _;
use shim_shimlet_process as _;

#[cfg(test)]
mod tests {
    #[test]
    fn the_expected_plugins_are_registered() {
        let shimlets: Vec<_> = shim_core::registry::shimlets()
            .unwrap()
            .iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(shimlets, ["docker", "k8s", "process"]);
        let pipelines: Vec<_> = shim_core::registry::pipelines()
            .unwrap()
            .iter()
            .map(|e| e.name)
            .collect();
        assert_eq!(pipelines, ["opensourcellm"]);
    }
}
