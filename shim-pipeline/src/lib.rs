//! Built-in pipelines of xmod-shim: `opensourcellm`, which deploys open-source LLMs with an
//! engine preset (vLLM, SGLang, llama.cpp, or the built-in mock engine).

mod cluster_fit;
pub mod opensourcellm;
pub mod presets;

pub use opensourcellm::{OpenSourceLlmConfig, build as opensourcellm};
pub use presets::{EnginePreset, Presets};

shim_core::inventory::submit! {
    shim_core::PipelineEntry::new(
        "opensourcellm",
        "validate, resolve model, render from an engine preset, apply, wait ready, expose",
        opensourcellm::build,
    )
}
