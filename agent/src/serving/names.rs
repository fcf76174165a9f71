//! Model and version names as they arrive in URL paths: the one rule every name must pass before
//! the repository touches the file system with it.
//!
//! Invariant: a name that passes [`check`] is one path component, so `root.join(name)` stays a
//! direct child of the repository root. The rule is `[A-Za-z0-9][A-Za-z0-9_.-]{0,127}`, applied
//! after axum has percent-decoded the path, so `%2e%2e`, `%2F` and `%00` are refused like `..`,
//! `/` and NUL.

/// Longest model or version name, bytes.
pub const MAX_NAME_LEN: usize = 128;

/// The rule, for error messages.
pub const RULE: &str =
    "1 to 128 ASCII letters, digits, '_', '.' or '-', starting with a letter or digit";

/// Why a name was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{kind} name {shown:?} is not allowed: a {kind} name must be {RULE}")]
pub struct NameError {
    /// `model` or `version`.
    pub kind: &'static str,
    /// The name, cut to a printable length.
    pub shown: String,
}

/// Checks a model (`kind = "model"`) or version (`kind = "version"`) name against the rule.
pub fn check(kind: &'static str, name: &str) -> Result<(), NameError> {
    let mut chars = name.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_alphanumeric());
    let rest_ok = chars.all(|c| c.is_ascii_alphanumeric() || "_.-".contains(c));
    if first_ok && rest_ok && name.len() <= MAX_NAME_LEN {
        return Ok(());
    }
    let shown: String = name.chars().take(MAX_NAME_LEN).collect();
    Err(NameError { kind, shown })
}

/// Whether `name` passes [`check`] as a model name.
pub fn is_model_name(name: &str) -> bool {
    check("model", name).is_ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rule() {
        let longest = "x".repeat(128);
        let too_long = "x".repeat(129);
        for ok in ["demo", "ocr_v2", "a", "A.b-c_9", "1", longest.as_str()] {
            assert!(check("model", ok).is_ok(), "{ok}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "-x",
            "_x",
            "a/b",
            "../etc",
            "a\0b",
            "a b",
            "é",
            "a\\b",
            too_long.as_str(),
        ] {
            let e = check("model", bad).expect_err(bad);
            assert!(e.to_string().contains("model name"), "{e}");
            assert!(e.to_string().contains("1 to 128 ASCII letters"), "{e}");
        }
        let e = check("version", "..").expect_err("dots");
        assert!(e.to_string().starts_with("version name \"..\""), "{e}");
    }
}
