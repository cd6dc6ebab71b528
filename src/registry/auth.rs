//! Registry credentials from a Docker config file (a `kubernetes.io/dockerconfigjson` Secret).
//!
//! The file is untrusted in shape and secret in content: every problem is reported by file
//! and field, never with a value, so a typo in a Secret cannot put a password in a log.

use std::path::Path;

use base64::Engine as _;
use oci_client::secrets::RegistryAuth;
use serde_json::{Map, Value};

use super::client::ClientError;

/// The largest credentials file we read; real ones are a few hundred bytes.
const MAX_FILE_BYTES: u64 = 1 << 20;

/// Docker Hub's historical key, which `docker login` still writes for `docker.io`.
const DOCKER_HUB_KEY: &str = "https://index.docker.io/v1/";

/// The credentials `path` holds for `host` (`host[:port]`); anonymous when it has none.
pub fn load(path: &Path, host: &str) -> Result<RegistryAuth, ClientError> {
    let bad = |problem: String| ClientError::Config(format!("registry auth file {}: {problem}", path.display()));
    let meta = std::fs::metadata(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    if meta.len() > MAX_FILE_BYTES {
        return Err(bad(format!("is {} bytes, over the limit of {MAX_FILE_BYTES}", meta.len())));
    }
    let raw = std::fs::read(path).map_err(|e| bad(format!("cannot read it: {e}")))?;
    parse(&raw, host).map_err(bad)
}

/// The credentials a Docker config document holds for `host`; the error names the problem
/// and the field, never a value.
pub fn parse(raw: &[u8], host: &str) -> Result<RegistryAuth, String> {
    // Parsed as a bare value first: serde's typed errors quote the offending value, which
    // here would be a password.
    let doc: Value =
        serde_json::from_slice(raw).map_err(|e| format!("is not JSON (line {}, column {})", e.line(), e.column()))?;
    let top = doc.as_object().ok_or("is not a JSON object")?;
    // `config.json` / `kubernetes.io/dockerconfigjson` nest the hosts under "auths"; the
    // legacy `.dockercfg` (`kubernetes.io/dockercfg`) has them at the top level.
    let (auths, field) = match top.get("auths") {
        Some(Value::Object(a)) => (a, "auths"),
        Some(_) => return Err("field auths is not an object".into()),
        None if top.values().all(Value::is_object) => (top, ""),
        None => return Err("has no field auths".into()),
    };
    let Some((key, entry)) = find_entry(auths, host) else {
        return Ok(RegistryAuth::Anonymous);
    };
    let name = if field.is_empty() { format!("{key:?}") } else { format!("{field}.{key:?}") };
    let field = |f: &str| format!("{name}.{f}");
    let entry = entry.as_object().ok_or_else(|| format!("field {name} is not an object"))?;
    let text = |f: &str| -> Result<Option<&str>, String> {
        match entry.get(f) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(format!("field {} is not a string", field(f))),
        }
    };

    let (mut user, mut pass) = (text("username")?.map(str::to_string), text("password")?.map(str::to_string));
    if let Some(auth) = text("auth")? {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(auth.trim())
            .map_err(|_| format!("field {} is not base64", field("auth")))?;
        let decoded = String::from_utf8(decoded).map_err(|_| format!("field {} is not UTF-8", field("auth")))?;
        let (u, p) =
            decoded.split_once(':').ok_or_else(|| format!("field {} is not base64 of user:password", field("auth")))?;
        if !u.is_empty() {
            user = Some(u.to_string());
        }
        if !p.is_empty() {
            pass = Some(p.to_string());
        }
    }
    if let Some(token) = text("registrytoken")? {
        // A registry token is sent as is, as the bearer of every request.
        return Ok(RegistryAuth::Bearer(token.to_string()));
    }
    if let Some(token) = text("identitytoken")? {
        // An identity token is a refresh token for the registry's token service, which takes
        // it as the password of a token request (what `docker login` does with it); sent
        // straight to the registry as a bearer it would be refused.
        return Ok(RegistryAuth::Basic(user.unwrap_or_else(|| "<token>".into()), token.to_string()));
    }
    match (user, pass) {
        (Some(u), Some(p)) => Ok(RegistryAuth::Basic(u, p)),
        (None, None) => Ok(RegistryAuth::Anonymous),
        (Some(_), None) => Err(format!("entry {name} has a user but no password")),
        (None, Some(_)) => Err(format!("entry {name} has a password but no user")),
    }
}

/// The entry for `host`: an exact key first, else a key naming the same host with a scheme
/// or a path (`https://host/v1/`, `http://host`), compared case-insensitively.
fn find_entry<'a>(auths: &'a Map<String, Value>, host: &str) -> Option<(&'a String, &'a Value)> {
    if let Some(e) = auths.get_key_value(host) {
        return Some(e);
    }
    let want = normalize(host);
    let hub = matches!(want.as_str(), "docker.io" | "index.docker.io" | "registry-1.docker.io");
    auths.iter().find(|(k, _)| {
        let k = normalize(k);
        k == want || (hub && (k == normalize(DOCKER_HUB_KEY) || k == "docker.io" || k == "registry-1.docker.io"))
    })
}

fn normalize(key: &str) -> String {
    let key = key.trim();
    let key = key.strip_prefix("https://").or_else(|| key.strip_prefix("http://")).unwrap_or(key);
    key.split('/').next().unwrap_or_default().to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn b64(s: &str) -> String {
        base64::engine::general_purpose::STANDARD.encode(s)
    }

    #[test]
    fn credentials_are_found_by_host_in_every_spelling_docker_writes() {
        let auth = b64("alice:s3cret:with:colons");
        for key in ["reg.example:5000", "https://reg.example:5000/v1/", "http://REG.example:5000", "reg.example:5000/"]
        {
            let doc =
                format!(r#"{{"auths":{{"other.example":{{"auth":"{}"}},"{key}":{{"auth":"{auth}"}}}}}}"#, b64("x:y"));
            let got = parse(doc.as_bytes(), "reg.example:5000").unwrap();
            assert_eq!(got, RegistryAuth::Basic("alice".into(), "s3cret:with:colons".into()), "{key}");
        }
        let hub = format!(r#"{{"auths":{{"{DOCKER_HUB_KEY}":{{"auth":"{auth}"}}}}}}"#);
        assert!(matches!(parse(hub.as_bytes(), "docker.io").unwrap(), RegistryAuth::Basic(..)));
    }

    #[test]
    fn fields_and_tokens_map_to_what_the_registry_expects() {
        let cases = [
            (r#"{"auths":{"r":{"username":"u","password":"p"}}}"#, RegistryAuth::Basic("u".into(), "p".into())),
            (r#"{"auths":{"r":{"registrytoken":"t"}}}"#, RegistryAuth::Bearer("t".into())),
            (r#"{"auths":{"r":{"identitytoken":"t"}}}"#, RegistryAuth::Basic("<token>".into(), "t".into())),
            (
                r#"{"auths":{"r":{"auth":"","identitytoken":"t","username":"u"}}}"#,
                RegistryAuth::Basic("u".into(), "t".into()),
            ),
            (r#"{"r":{"username":"u","password":"p","email":"e"}}"#, RegistryAuth::Basic("u".into(), "p".into())),
            (r#"{"auths":{"other":{"username":"u","password":"p"}}}"#, RegistryAuth::Anonymous),
            (r#"{"auths":{"r":{}}}"#, RegistryAuth::Anonymous),
            (r#"{"auths":{}, "credsStore":"desktop"}"#, RegistryAuth::Anonymous),
        ];
        for (doc, want) in cases {
            assert_eq!(parse(doc.as_bytes(), "r").unwrap(), want, "{doc}");
        }
    }

    #[test]
    fn a_bad_file_names_the_field_and_never_the_secret() {
        let cases = [
            (r#"{"auths":{"r":{"auth":"!!not-base64-hunter2"}}}"#, r#"auths."r".auth is not base64"#),
            (&format!(r#"{{"auths":{{"r":{{"auth":"{}"}}}}}}"#, b64("hunter2")), "not base64 of user:password"),
            (r#"{"auths":{"r":{"password":"hunter2"}}}"#, "password but no user"),
            (r#"{"auths":{"r":{"username":"u","password":["hunter2"]}}}"#, r#"auths."r".password is not a string"#),
            (r#"{"auths":["hunter2"]}"#, "auths is not an object"),
            (r#"{"auths":{"r":{"password":"hunter2"#, "is not JSON (line 1"),
            (r#""hunter2""#, "is not a JSON object"),
        ];
        for (doc, want) in cases {
            let err = parse(doc.as_bytes(), "r").unwrap_err();
            assert!(err.contains(want), "{doc}: {err}");
            assert!(!err.contains("hunter2"), "{doc}: {err}");
        }
    }

    #[test]
    fn a_missing_file_is_a_configuration_error_naming_it() {
        let err = load(Path::new("/nonexistent/config.json"), "r").unwrap_err();
        assert!(matches!(err, ClientError::Config(_)));
        assert!(err.to_string().contains("/nonexistent/config.json"), "{err}");
    }
}
