//! Kubernetes shimlet for xmod-shim: **not implemented yet**.
//!
//! The crate exists so the workspace has its final shape and the binary already links it. It
//! registers nothing, so `--shimlet=k8s` is refused at start-up with the list of shimlets that do
//! exist, rather than pretending to deploy anything. The planned design (a Deployment plus a
//! Service per model service, server-side apply, watch-fed status) is in docs/architecture.md.

// Keeps the dependency honest: the implementation will build on shim-core's Shimlet trait.
use shim_core as _;
