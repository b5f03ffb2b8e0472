//! The effective config as an operator may see it (admin `GET /config`, `--check --diff`):
//! TOML with every secret replaced by `"***"`.
//!
//! Secrets are found by shape, not by a list of today's fields, so a new one is hidden
//! without anyone remembering to: a string under a key named like a secret (`secret`,
//! `password`, `token`), and the password of any URL with one (`redis://:pw@host`).

use super::RawConfig;

/// What a secret shows as.
pub const HIDDEN: &str = "***";

/// Keys whose string value is a secret wherever they appear.
const SECRET_KEYS: &[&str] = &["secret", "password", "token"];

/// `raw` as TOML, secrets hidden. Tables come out with their keys in sorted order, so two
/// renderings diff line by line.
pub fn redacted_toml(raw: &RawConfig) -> Result<String, toml::ser::Error> {
    let mut value = toml::Value::try_from(raw)?;
    redact(&mut value);
    toml::to_string_pretty(&value)
}

fn redact(value: &mut toml::Value) {
    match value {
        toml::Value::Table(t) => {
            for (key, v) in t.iter_mut() {
                if v.is_str() && SECRET_KEYS.contains(&key.as_str()) {
                    *v = toml::Value::String(HIDDEN.to_owned());
                } else {
                    redact(v);
                }
            }
        }
        toml::Value::Array(items) => items.iter_mut().for_each(redact),
        toml::Value::String(s) => {
            if let Some(hidden) = hide_url_password(s) {
                *s = hidden;
            }
        }
        _ => {}
    }
}

/// `scheme://user:password@host...` -> `scheme://user:***@host...`; `None` when `s` is
/// not a URL with a password.
pub(super) fn hide_url_password(s: &str) -> Option<String> {
    let (scheme, rest) = s.split_once("://")?;
    let authority = &rest[..rest.find(['/', '?', '#']).unwrap_or(rest.len())];
    let at = authority.rfind('@')?;
    let (user, _password) = authority[..at].split_once(':')?;
    Some(format!("{scheme}://{user}:{HIDDEN}{}", &rest[at..]))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn url_passwords_are_hidden_and_the_rest_kept() {
        assert_eq!(hide_url_password("redis://:s3cret@cache:6379/0").unwrap(), "redis://:***@cache:6379/0");
        assert_eq!(hide_url_password("rediss://app:p@ss:w@cache/1?x=y").unwrap(), "rediss://app:***@cache/1?x=y");
        assert_eq!(hide_url_password("redis://cache:6379"), None);
        assert_eq!(hide_url_password("redis://user@cache"), None);
        assert_eq!(hide_url_password("http://h/p?u=a:b@c"), None);
        assert_eq!(hide_url_password("plain:text@x"), None);
    }

    #[test]
    fn secrets_are_hidden_wherever_they_are() {
        let mut v: toml::Value = toml::from_str(
            "[a]\nsecret = \"k\"\nurl = \"redis://u:pw@h\"\nkey = \"header:X\"\n[[b]]\ntoken = \"t\"\nlist = [\"redis://:x@h\"]\n",
        )
        .unwrap();
        redact(&mut v);
        let text = toml::to_string(&v).unwrap();
        for gone in ["\"k\"", "pw", "\"t\"", ":x@"] {
            assert!(!text.contains(gone), "{gone} still in {text}");
        }
        assert_eq!(v["a"]["secret"].as_str(), Some(HIDDEN));
        assert_eq!(v["a"]["url"].as_str(), Some("redis://u:***@h"));
        assert_eq!(v["a"]["key"].as_str(), Some("header:X"), "not a secret");
        assert_eq!(v["b"][0]["token"].as_str(), Some(HIDDEN));
        assert_eq!(v["b"][0]["list"][0].as_str(), Some("redis://:***@h"));
    }
}
