//! Who may talk to the server, decided before routing: the `Host` a request
//! names and the browser `Origin` it comes from.
//!
//! A model server on localhost is reachable from every web page its user
//! opens. Two things keep such pages out:
//! - **Origin**: browsers stamp cross-origin requests (fetch, forms) with an
//!   `Origin` header; native clients (the SDKs, Claude Code, curl) send none.
//!   A request with an origin that `--cors-origin` does not list is refused,
//!   and CORS headers go only to listed origins.
//! - **Host**: a DNS-rebinding page reaches 127.0.0.1 under its own domain
//!   name, so its requests carry `Host: attacker.example`. Only names that
//!   mean this server are answered: IP literals (rebinding needs a name),
//!   `localhost` and `*.localhost`, the `--host` value, the machine's own
//!   name when bound to every interface, and `--allowed-hosts`.

use std::net::IpAddr;

use hyper::header::HeaderValue;
use hyper::HeaderMap;

use crate::config::Config;
use crate::error::ApiError;

/// The request-independent part of the policy, built once from the config.
#[derive(Debug, Clone, Default)]
pub struct AccessPolicy {
    /// Lower-case host names (no port) answered besides IPs and localhost.
    hosts: Vec<String>,
    any_host: bool,
    /// Browser origins allowed, as sent (scheme://host[:port]), lower-case.
    origins: Vec<String>,
    any_origin: bool,
}

impl AccessPolicy {
    pub fn from_config(config: &Config) -> AccessPolicy {
        let mut hosts: Vec<String> = Vec::new();
        let bind = normalize_host(&config.host);
        let wildcard = bind.is_empty() || bind.parse::<IpAddr>().is_ok_and(|ip| ip.is_unspecified());
        if !bind.is_empty() {
            hosts.push(bind);
        }
        if wildcard {
            // Bound to every interface: the machine's own name reaches it too.
            if let Some(name) = hostname() {
                hosts.push(format!("{name}.local"));
                hosts.push(name);
            }
        }
        let mut any_host = false;
        for h in &config.allowed_hosts {
            let h = h.trim();
            if h == "*" {
                any_host = true;
            } else if !h.is_empty() {
                hosts.push(normalize_host(h));
            }
        }
        let mut origins = Vec::new();
        let mut any_origin = false;
        for o in &config.cors_origin {
            let o = o.trim().trim_end_matches('/');
            if o == "*" {
                any_origin = true;
            } else if !o.is_empty() {
                origins.push(o.to_ascii_lowercase());
            }
        }
        AccessPolicy { hosts, any_host, origins, any_origin }
    }

    /// Whether a `Host` header value (`name[:port]`, `[v6]:port`) names this server.
    pub fn host_allowed(&self, authority: &str) -> bool {
        if self.any_host {
            return true;
        }
        let host = normalize_host(strip_port(authority.trim()));
        if host.is_empty() || host.parse::<IpAddr>().is_ok() {
            return true;
        }
        if host == "localhost" || host.ends_with(".localhost") {
            return true;
        }
        self.hosts.contains(&host)
    }

    /// Whether a browser origin may call this server.
    pub fn origin_allowed(&self, origin: &str) -> bool {
        self.any_origin || self.origins.iter().any(|o| o.eq_ignore_ascii_case(origin.trim_end_matches('/')))
    }

    /// Checks a request's headers: `Ok(Some(origin))` for an allowed browser
    /// origin (CORS headers are due), `Ok(None)` for a request from no browser.
    pub fn check(&self, headers: &HeaderMap, uri_host: Option<&str>) -> Result<Option<String>, ApiError> {
        let host = headers.get(hyper::header::HOST).and_then(|v| v.to_str().ok()).or(uri_host);
        if let Some(h) = host {
            if !self.host_allowed(h) {
                return Err(ApiError::Forbidden(format!(
                    "this server does not answer to the host name {:?}: use localhost or 127.0.0.1, or allow the name with --allowed-hosts (for a reverse proxy)",
                    strip_port(h)
                )));
            }
        }
        let Some(origin) = headers.get(hyper::header::ORIGIN) else { return Ok(None) };
        let origin = origin.to_str().unwrap_or("<not text>");
        if self.origin_allowed(origin) {
            return Ok(Some(origin.to_string()));
        }
        Err(ApiError::Forbidden(format!(
            "requests from web pages are refused (Origin: {origin}); to let a page use this server, start it with --cors-origin {origin}"
        )))
    }
}

/// CORS headers for an allowed origin, on every response to it.
pub fn add_cors_headers(headers: &mut HeaderMap, origin: &str) {
    if let Ok(v) = HeaderValue::from_str(origin) {
        headers.insert("access-control-allow-origin", v);
        headers.append(hyper::header::VARY, HeaderValue::from_static("Origin"));
        headers.insert("access-control-expose-headers", HeaderValue::from_static("request-id, retry-after"));
    }
}

/// The answer to a CORS preflight from an allowed origin.
pub fn preflight_headers(headers: &mut HeaderMap, requested: Option<&HeaderValue>) {
    headers.insert("access-control-allow-methods", HeaderValue::from_static("GET, POST, OPTIONS"));
    let allow = requested
        .cloned()
        .unwrap_or_else(|| HeaderValue::from_static("content-type, authorization, x-api-key, anthropic-version, anthropic-beta"));
    headers.insert("access-control-allow-headers", allow);
    headers.insert("access-control-max-age", HeaderValue::from_static("600"));
}

fn strip_port(authority: &str) -> &str {
    if let Some(rest) = authority.strip_prefix('[') {
        // [v6]:port
        return rest.split(']').next().unwrap_or(rest);
    }
    match authority.rsplit_once(':') {
        // One colon: name:port. More: a bare IPv6 literal.
        Some((h, p)) if !h.contains(':') && p.chars().all(|c| c.is_ascii_digit()) => h,
        _ => authority,
    }
}

fn normalize_host(h: &str) -> String {
    h.trim().trim_start_matches('[').trim_end_matches(']').trim_end_matches('.').to_ascii_lowercase()
}

fn hostname() -> Option<String> {
    let mut buf = [0u8; 256];
    // SAFETY: gethostname writes at most buf.len() bytes into buf.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr() as *mut libc::c_char, buf.len()) };
    if rc != 0 {
        return None;
    }
    let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
    let name = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
    (!name.is_empty()).then_some(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(args: &[&str]) -> AccessPolicy {
        use clap::Parser;
        let mut argv = vec!["pensieve"];
        argv.extend_from_slice(args);
        AccessPolicy::from_config(&Config::parse_from(argv))
    }

    #[test]
    fn loopback_names_and_ip_literals_are_this_server() {
        let p = policy(&[]);
        for h in [
            "localhost",
            "localhost:7777",
            "LOCALHOST.:7777",
            "127.0.0.1:7777",
            "127.0.0.2",
            "[::1]:7777",
            "::1",
            "10.1.2.3:80",
            "app.localhost:7777",
        ] {
            assert!(p.host_allowed(h), "{h}");
        }
        for h in ["attacker.example", "attacker.example:7777", "localhost.attacker.example", "127.0.0.1.nip.io:7777"] {
            assert!(!p.host_allowed(h), "{h}");
        }
    }

    #[test]
    fn allowed_hosts_and_the_bind_name_extend_the_list() {
        let p = policy(&["--host", "myhost.lan", "--allowed-hosts", "proxy.example,Other.Example."]);
        assert!(p.host_allowed("myhost.lan:7777"));
        assert!(p.host_allowed("proxy.example"));
        assert!(p.host_allowed("other.example:443"));
        assert!(!p.host_allowed("third.example"));
        assert!(policy(&["--allowed-hosts", "*"]).host_allowed("anything.example"));
    }

    #[test]
    fn origins_need_to_be_listed() {
        let mut h = HeaderMap::new();
        h.insert(hyper::header::HOST, HeaderValue::from_static("127.0.0.1:7777"));
        assert_eq!(policy(&[]).check(&h, None).unwrap(), None);
        h.insert(hyper::header::ORIGIN, HeaderValue::from_static("https://evil.example"));
        let e = policy(&[]).check(&h, None).unwrap_err();
        assert_eq!(e.status(), 403);
        assert!(e.message().contains("--cors-origin"), "{}", e.message());
        let p = policy(&["--cors-origin", "https://evil.example/"]);
        assert_eq!(p.check(&h, None).unwrap().as_deref(), Some("https://evil.example"));
        h.insert(hyper::header::ORIGIN, HeaderValue::from_static("null"));
        assert!(p.check(&h, None).is_err());
    }
}
