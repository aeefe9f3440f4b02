//! Python virtualenvs that tests need (the OpenAI SDK, schemathesis), created once per machine
//! in a per-user cache directory beside the llama.cpp one and reused by every clone.

use std::path::{Path, PathBuf};
use std::process::Command;

/// One virtualenv: where it lives, what goes in, and how to tell it is ready.
#[derive(Debug)]
pub struct Venv {
    /// Directory name under the cache (`venv-<name>`).
    pub name: &'static str,
    /// Environment variable that overrides the directory.
    pub override_var: &'static str,
    /// Pinned, so CI tests the versions that were tested here.
    pub packages: &'static [&'static str],
    /// Python statement that succeeds once the packages are usable.
    pub ready_check: &'static str,
}

impl Venv {
    /// The virtualenv's directory.
    pub fn dir(&self) -> PathBuf {
        if let Some(dir) = std::env::var_os(self.override_var) {
            return PathBuf::from(dir);
        }
        super::llama_venv()
            .parent()
            .map_or_else(|| PathBuf::from("/tmp"), Path::to_path_buf)
            .join(format!("venv-{}", self.name))
    }

    /// Creates or reuses the virtualenv; returns its `bin` directory.
    pub fn bin(&self) -> anyhow::Result<PathBuf> {
        let venv = self.dir();
        let bin = venv.join("bin");
        let python = bin.join("python3");
        let ready = |python: &Path| {
            Command::new(python)
                .args(["-c", self.ready_check])
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success())
        };
        if ready(&python) {
            eprintln!("reusing {}", venv.display());
            return Ok(bin);
        }
        eprintln!("creating {}", venv.display());
        let system_python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".into());
        super::run(Command::new(&system_python).args(["-m", "venv"]).arg(&venv))?;
        super::run(
            Command::new(&python)
                .args(["-m", "pip", "install", "--quiet"])
                .args(self.packages),
        )?;
        anyhow::ensure!(
            ready(&python),
            "{} was installed but `{}` fails",
            venv.display(),
            self.ready_check
        );
        Ok(bin)
    }
}
