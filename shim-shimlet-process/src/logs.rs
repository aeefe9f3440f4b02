//! Reading the end of replica log files without loading them whole (engine logs grow large).

use std::fs::File;
use std::io::{self, Read, Seek, SeekFrom};
use std::path::Path;

const CHUNK: u64 = 8 * 1024;

/// The last `n` lines of the file at `path` (lossy UTF-8, without line terminators).
/// A missing file has no lines.
///
/// # Errors
/// I/O errors other than "not found".
pub(crate) fn tail_lines(path: &Path, n: usize) -> io::Result<Vec<String>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let mut file = match File::open(path) {
        Ok(file) => file,
        Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(err) => return Err(err),
    };
    let len = file.seek(SeekFrom::End(0))?;
    let mut start = len;
    let mut buf: Vec<u8> = Vec::new();
    // Read chunks backwards until the buffer holds more than `n` line breaks (one extra, because
    // a trailing newline ends the last line rather than starting a new one) or the file start.
    while start > 0 && bytecount_newlines(&buf) <= n {
        let step = CHUNK.min(start);
        start -= step;
        file.seek(SeekFrom::Start(start))?;
        let mut chunk = vec![0; usize::try_from(step).unwrap_or(usize::MAX)];
        file.read_exact(&mut chunk)?;
        chunk.extend_from_slice(&buf);
        buf = chunk;
    }
    let text = String::from_utf8_lossy(&buf);
    let mut lines: Vec<&str> = text.lines().collect();
    if start > 0 && !lines.is_empty() {
        // The first line is probably cut; there are enough whole ones after it.
        lines.remove(0);
    }
    let skip = lines.len().saturating_sub(n);
    Ok(lines[skip..].iter().map(|l| (*l).to_string()).collect())
}

fn bytecount_newlines(buf: &[u8]) -> usize {
    buf.iter().filter(|b| **b == b'\n').count()
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    #[test]
    fn tails_small_and_large_files() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.log");
        assert!(tail_lines(&path, 5).unwrap().is_empty());

        std::fs::write(&path, "one\ntwo\nthree\n").unwrap();
        assert_eq!(tail_lines(&path, 2).unwrap(), ["two", "three"]);
        assert_eq!(tail_lines(&path, 10).unwrap(), ["one", "two", "three"]);
        assert!(tail_lines(&path, 0).unwrap().is_empty());

        std::fs::write(&path, "no newline at end").unwrap();
        assert_eq!(tail_lines(&path, 1).unwrap(), ["no newline at end"]);

        let mut file = File::create(&path).unwrap();
        for i in 0..10_000 {
            writeln!(file, "line {i} {}", "x".repeat(i % 50)).unwrap();
        }
        drop(file);
        let tail = tail_lines(&path, 3).unwrap();
        assert_eq!(tail.len(), 3);
        assert!(tail[0].starts_with("line 9997 "));
        assert!(tail[2].starts_with("line 9999 "));
        let many = tail_lines(&path, 5000).unwrap();
        assert_eq!(many.len(), 5000);
        assert!(many[0].starts_with("line 5000 "));
    }
}
