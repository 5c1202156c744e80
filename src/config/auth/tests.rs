use std::io::Write;

use crate::auth::AuthSettings;
use crate::config::{Config, Env};

const ROUTE: &str = "[[routes]]\npath = \"/\"\ntargets = [\"http://127.0.0.1:1\"]\n";

fn problems(auth: &str, env: &Env) -> Vec<String> {
    match Config::from_toml(&format!("{ROUTE}auth = {auth}\n"), env) {
        Ok(_) => Vec::new(),
        Err(e) => e.problems(),
    }
}

fn settings(auth: &str, env: &Env) -> AuthSettings {
    let c = Config::from_toml(&format!("{ROUTE}auth = {auth}\n"), env)
        .unwrap_or_else(|e| panic!("{:?}", e.problems()));
    c.routes[0].auth.clone().unwrap()
}

use crate::auth::api_keys::sha256_hex as sha_hex;

#[test]
fn exactly_one_method_and_one_key_source() {
    let env = Env::default();
    assert_eq!(
        problems("{}", &env),
        ["routes[0].auth: needs exactly one of jwt, api_keys or forward (one method per route)"]
    );
    assert_eq!(
        problems(
            "{ jwt = { jwks_url = \"http://a/\", jwks_file = \"x\" } }",
            &env
        ),
        ["routes[0].auth.jwt: needs exactly one key source: jwks_url, jwks_file or hs256_secret_env"]
    );
    assert_eq!(
        problems("{ jwt = { jwks_url = \"ftp://a/\" } }", &env),
        ["routes[0].auth.jwt.jwks_url: invalid URL \"ftp://a/\"; expected http:// or https:// with a host"]
    );
}

#[test]
fn bad_values_name_their_key_path() {
    let env = Env::from_pairs([("SHORT", "too-short")]);
    let p = problems(
        "{ jwt = { hs256_secret_env = \"SHORT\", leeway = \"soon\", forward_claims = { sub = \"bad header\" }, required_claims = { role = {} }, colour = 1 } }",
        &env,
    );
    let paths: Vec<&str> = p.iter().map(|l| l.split(':').next().unwrap()).collect();
    assert_eq!(
        paths,
        [
            "routes[0].auth.jwt.colour",
            "routes[0].auth.jwt.leeway",
            "routes[0].auth.jwt.hs256_secret_env",
            "routes[0].auth.jwt.required_claims.role",
            "routes[0].auth.jwt.forward_claims.sub",
        ],
        "{p:?}"
    );
    assert_eq!(
        problems("{ jwt = { hs256_secret_env = \"UNSET\" } }", &env),
        ["routes[0].auth.jwt.hs256_secret_env: environment variable UNSET is not set"]
    );
    assert_eq!(
        problems(
            "{ forward = { url = \"http://auth:8080/check\", on_error = \"maybe\", timeout = \"0s\" } }",
            &env
        )
        .len(),
        2
    );
    assert_eq!(
        problems("{ jwt = { jwks_file = \"/nonexistent/jwks.json\" } }", &env).len(),
        1
    );
}

#[test]
fn api_keys_from_file_and_env_with_line_problems() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(file, "# ops team\nalice {}", sha_hex("alice-key")).unwrap();
    let env = Env::from_pairs([("KEYS", format!("bob {}\n", sha_hex("bob-key")))]);
    let path = file.path().display().to_string();
    let auth = settings(
        &format!("{{ api_keys = {{ keys_file = {path:?}, keys_env = \"KEYS\" }} }}"),
        &env,
    );
    let AuthSettings::ApiKeys(keys) = auth else {
        panic!("{auth:?}")
    };
    assert_eq!(keys.len(), 2);
    assert_eq!(keys.find(b"bob-key").map(|n| &**n), Some("bob"));
    assert_eq!(keys.header.as_str(), "x-api-key");

    let env = Env::from_pairs([("KEYS", "carol not-a-hash\n")]);
    assert_eq!(
        problems("{ api_keys = { keys_env = \"KEYS\" } }", &env),
        ["routes[0].auth.api_keys.keys_env: KEYS line 1: key \"carol\": the second field must be 64 hex digits (the SHA-256 of the key, e.g. from `printf %s KEY | sha256sum`)"]
    );
    assert_eq!(
        problems("{ api_keys = { header = \"X-Key\" } }", &env),
        ["routes[0].auth.api_keys: needs keys_file or keys_env (or both)"]
    );
}

#[test]
fn an_unchanged_file_keeps_equal_settings_and_a_changed_one_does_not() {
    let mut file = tempfile::NamedTempFile::new().unwrap();
    writeln!(file, "alice {}", sha_hex("a")).unwrap();
    let path = file.path().display().to_string();
    let toml = format!("{{ api_keys = {{ keys_file = {path:?} }} }}");
    let env = Env::default();
    let first = settings(&toml, &env);
    assert_eq!(first, settings(&toml, &env));
    writeln!(file, "bob {}", sha_hex("b")).unwrap();
    assert_ne!(first, settings(&toml, &env));
}
