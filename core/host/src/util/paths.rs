//! Names that become file or directory names (a run's `--name`, an
//! experiment's and its variants' names, dataset names) are checked here, so
//! that none of them can leave the output directory (`../x`, `/etc/x`) or
//! hide in it (`.x`, the empty name).

/// Longest name accepted: well under a file system's 255-byte limit, leaving
/// room for the `.DATASET.json` suffixes put after it.
pub const MAX_NAME: usize = 100;

/// Checks `name` as one path component; `what` names it in the error
/// ("--name", "variant name", ...). Allowed: ASCII letters, digits and
/// `- _ . + = @ ,`, not starting with `.` (hidden, `..`) or `-` (read as an
/// option by other tools), at most
/// [`MAX_NAME`] characters.
pub fn check_name(what: &str, name: &str) -> Result<(), String> {
    let bad = |why: &str| Err(format!("{what} {name:?} {why}"));
    if name.is_empty() {
        return Err(format!("{what} is empty"));
    }
    if name.len() > MAX_NAME {
        return bad(&format!("is longer than {MAX_NAME} characters"));
    }
    if let Some(c) = name.chars().find(|c| !(c.is_ascii_alphanumeric() || "-_.+=@,".contains(*c))) {
        let c = if c.is_control() || c.is_whitespace() { format!("{:?}", c) } else { format!("`{c}`") };
        return bad(&format!("contains {c}: a name becomes a file name, so use letters, digits and - _ . + = @ , only"));
    }
    if name.starts_with(['.', '-']) {
        return bad("must not start with `.` or `-` (it becomes a file name)");
    }
    Ok(())
}

/// A valid name made from any text (a folder's name, which the user did not
/// choose as a run name): other characters become `_`, leading ones that may
/// not start a name are dropped, the length is capped; `dataset` if nothing is left.
pub fn sanitize(text: &str) -> String {
    let s: String = text.chars().map(|c| if c.is_ascii_alphanumeric() || "-_.+=@,".contains(c) { c } else { '_' }).collect();
    let s = s.trim_start_matches(['.', '-']);
    let s: String = s.chars().take(MAX_NAME).collect();
    if s.is_empty() { "dataset".into() } else { s }
}

#[cfg(test)]
mod tests {
    use super::check_name;

    #[test]
    fn names_that_would_leave_or_hide_in_the_directory_are_refused() {
        for bad in ["", "..", ".", "../x", "../../../../PWNED", "a/b", "/etc/passwd", ".hidden", "a\\b", "a\0b", "a b", "-x", &"x".repeat(101)] {
            assert!(check_name("--name", bad).is_err(), "{bad:?} accepted");
        }
        for good in ["minilm", "base+rlrf", "w=0.8", "run_1.2", "_x", "BM25", "+RLRF"] {
            assert!(check_name("--name", good).is_ok(), "{good:?} refused");
        }
        assert_eq!(check_name("--name", "").unwrap_err(), "--name is empty");
        assert!(check_name("variant name", "../x").unwrap_err().contains("contains `/`"));
    }

    #[test]
    fn sanitized_names_are_valid() {
        for t in ["", "..", ".tmpAbC", "my data", "a/b", "ü", &"y".repeat(300)] {
            let s = super::sanitize(t);
            assert!(check_name("x", &s).is_ok(), "{t:?} -> {s:?}");
        }
        assert_eq!(super::sanitize(".tmpAbC"), "tmpAbC");
        assert_eq!(super::sanitize("scifact"), "scifact");
    }
}

/// `create_dir_all` with a message that says what is wrong when a file is in
/// the way (std's is a bare "File exists (os error 17)" or "Not a directory").
pub fn ensure_dir(path: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(path).map_err(|e| {
        let blocker = path.ancestors().find(|a| a.exists() && !a.is_dir());
        match blocker {
            Some(b) if b == path => std::io::Error::new(e.kind(), "exists and is a file, not a directory (pass a directory for the output)"),
            Some(b) => std::io::Error::new(e.kind(), format!("{} is a file, not a directory (pass a directory for the output)", b.display())),
            None => e,
        }
    })
}
