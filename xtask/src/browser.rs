//! The browser the web console's end-to-end test drives: Chromium and chromedriver from the
//! Debian packages `chromium` and `chromium-driver`, installed with apt when missing.

use std::process::Command;

use anyhow::{Context as _, bail};

/// Programs the test needs, and the package that brings each.
const NEEDED: &[(&str, &str)] = &[
    ("chromium", "chromium"),
    ("chromedriver", "chromium-driver"),
];

fn on_path(program: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|path| std::env::split_paths(&path).any(|dir| dir.join(program).is_file()))
}

/// Installs the missing packages (as root directly, otherwise through sudo). CI runs the test
/// with `CI=true`, under which the test fails rather than skips without a browser, so an
/// install failure here is an error too.
pub fn ensure_chromium() -> anyhow::Result<()> {
    let missing: Vec<&str> = NEEDED
        .iter()
        .filter(|(program, _)| !on_path(program))
        .map(|&(_, package)| package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    let root = Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0");
    let apt = |args: &[&str]| -> anyhow::Result<()> {
        let mut command = if root {
            Command::new("apt-get")
        } else {
            let mut sudo = Command::new("sudo");
            sudo.arg("apt-get");
            sudo
        };
        println!("$ apt-get {}", args.join(" "));
        let status = command
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("cannot run apt-get (the browser test needs Debian's chromium packages)")?;
        if !status.success() {
            bail!("apt-get {} failed ({status})", args.join(" "));
        }
        Ok(())
    };
    apt(&["update", "-q"])?;
    // With the recommended packages (fonts among them), as the tests were written against.
    let mut install = vec!["install", "-y", "-q"];
    install.extend(&missing);
    apt(&install)?;
    for (program, package) in NEEDED {
        if !on_path(program) {
            bail!("{package} is installed but {program} is not on PATH");
        }
    }
    Ok(())
}
